"""Handwritten digits (scikit-learn's 8x8 images) with a small MLP.

Clients send the 64 raw pixel values (0..16) as ``pixels``; the model normalises them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from modelloop.training.spec import Dataset
from modelloop.training.specs._layers import dense_block

NAME = "digits"
TASK = "multiclass"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
HPARAMS = {"epochs": 80, "dropout": 0.2, "l2": 1e-4, "patience": 10}


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
    """Normalization -> 2 x (Dense 128 + dropout) -> softmax over 10 digits."""
    inputs = keras.Input(shape=(64,), name=INPUT_NAME)
    x = normalizer(inputs)
    x = dense_block(x, 128, hparams)
    x = dense_block(x, 64, hparams)
    outputs = keras.layers.Dense(10, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="digits_mlp")
