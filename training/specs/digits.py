"""Handwritten digits (scikit-learn's 8x8 images) with a small MLP.

Clients send the 64 raw pixel values (0..16) as ``pixels``; the model scales them by the
known pixel range, not by the training rows' statistics: three pixels are always blank in
training and several nearly so, and dividing by their tiny standard deviation would turn
one stray pixel into an enormous input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from modelloop.training.spec import Choice, Dataset, FloatRange, IntRange
from modelloop.training.specs._layers import dense_block

NAME = "digits"
TASK = "multiclass"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
PIXEL_RANGE = (0.0, 16.0)
HPARAMS = {"epochs": 80, "dropout": 0.2, "l2": 1e-4, "patience": 10, "units": 128, "layers": 2}
SEARCH_SPACE = {
    "units": Choice(64, 128, 256),
    "layers": IntRange(1, 3),
    "dropout": FloatRange(0.0, 0.5),
    "l2": FloatRange(1e-6, 1e-2, log=True),
    "learning_rate": FloatRange(1e-4, 1e-2, log=True),
}


def load_data() -> Dataset:
    """Loads the 1,797 digits bundled with scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return Dataset(
        x=bunch.data.astype(np.float32),
        y=bunch.target.astype(np.int64),
        feature_names=names,
        class_labels=[str(d) for d in range(10)],
    )


def build_model(normalizer: keras.layers.Layer, hparams: Mapping[str, Any]) -> keras.Model:
    """Normalization -> ``layers`` x (Dense ``units`` + dropout) -> softmax over 10 digits."""
    inputs = keras.Input(shape=(64,), name=INPUT_NAME)
    x = normalizer(inputs)
    for _ in range(int(hparams["layers"])):
        x = dense_block(x, int(hparams["units"]), hparams)
    outputs = keras.layers.Dense(10, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="digits_mlp")
