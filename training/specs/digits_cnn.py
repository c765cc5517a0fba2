"""Handwritten digits with a small Conv2D network.

The 64 raw pixels arrive flat, as for ``digits``; the model reshapes them to 8x8x1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from modelloop.training.spec import Choice, FloatRange, IntRange
from modelloop.training.specs.digits import PIXEL_RANGE, load_data

NAME = "digits-cnn"
TASK = "multiclass"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
HPARAMS = {
    "epochs": 60,
    "dropout": 0.25,
    "l2": 1e-4,
    "patience": 12,
    "learning_rate": 1e-3,
    "units": 64,
    "layers": 2,
}
SEARCH_SPACE = {
    "units": Choice(32, 64, 128),
    "layers": IntRange(1, 3),
    "dropout": FloatRange(0.0, 0.5),
    "l2": FloatRange(1e-6, 1e-2, log=True),
    "learning_rate": FloatRange(3e-4, 1e-2, log=True),
}

__all__ = ["PIXEL_RANGE", "build_model", "load_data"]


def build_model(normalizer: keras.layers.Layer, hparams: Mapping[str, Any]) -> keras.Model:
    """Normalization -> 8x8x1 -> ``layers`` x Conv2D (32, 64, 128 filters) -> pooling -> dense -> softmax.

    ``layers`` is the depth of the convolutional stack and ``units`` the width of the dense
    layer after it.
    """
    l2 = keras.regularizers.L2(float(hparams["l2"]))
    inputs = keras.Input(shape=(64,), name=INPUT_NAME)
    x = normalizer(inputs)
    x = keras.layers.Reshape((8, 8, 1))(x)
    for i in range(int(hparams["layers"])):
        x = keras.layers.Conv2D(32 * 2**i, 3, padding="same", activation="relu", kernel_regularizer=l2)(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(float(hparams["dropout"]))(x)
    x = keras.layers.Dense(int(hparams["units"]), activation="relu", kernel_regularizer=l2)(x)
    outputs = keras.layers.Dense(10, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="digits_cnn")
