"""Diabetes progression (10 features): regression of a disease score one year on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from modelloop.training.spec import Dataset
from modelloop.training.specs._layers import dense_block

NAME = "diabetes"
TASK = "regression"
INPUT_NAME = "features"
OUTPUT_NAME = "prediction"
HPARAMS = {"epochs": 300, "dropout": 0.1, "l2": 1e-3, "patience": 20, "learning_rate": 3e-4}


def load_data() -> Dataset:
    """Loads the 442 patients bundled with scikit-learn (scaled features)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    return Dataset(
        x=bunch.data.astype(np.float32),
        y=bunch.target.astype(np.float32),
        feature_names=[str(n) for n in bunch.feature_names],
    )


def build_model(normalizer: keras.layers.Layer, hparams: Mapping[str, Any]) -> keras.Model:
    """Normalization -> Dense 32 + dropout -> linear output, rescaled to target units.

    The trainer passes the training targets' ``target_mean`` and ``target_std`` in
    ``hparams``; the last layer maps the standardised output back to the score scale,
    so the network learns on a unit scale and clients still get raw scores.
    """
    inputs = keras.Input(shape=(10,), name=INPUT_NAME)
    x = normalizer(inputs)
    x = dense_block(x, 32, hparams)
    x = keras.layers.Dense(1)(x)
    outputs = keras.layers.Rescaling(
        scale=float(hparams.get("target_std", 1.0)),
        offset=float(hparams.get("target_mean", 0.0)),
        name=OUTPUT_NAME,
    )(x)
    return keras.Model(inputs, outputs, name="diabetes_mlp")
