"""Diabetes progression (10 features): regression of a disease score one year on.

On 442 patients a ridge regression is the model to beat: most of the signal is linear.
The model is "wide and deep": the standardised features reach the output both directly
(a linear model inside the network) and through one small, heavily regularised hidden
layer, so the network keeps the linear fit and adds what the hidden layer finds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from modelloop.training.spec import Choice, Dataset, FloatRange, IntRange
from modelloop.training.specs._layers import dense_block

NAME = "diabetes"
TASK = "regression"
INPUT_NAME = "features"
OUTPUT_NAME = "prediction"
HPARAMS = {
    "epochs": 300,
    "dropout": 0.3,
    "l2": 1e-2,
    "patience": 20,
    "learning_rate": 1e-3,
    "units": 16,
    "layers": 1,
}
SEARCH_SPACE = {
    "units": Choice(8, 16, 32, 64),
    "layers": IntRange(0, 2),
    "dropout": FloatRange(0.0, 0.5),
    "l2": FloatRange(1e-4, 1e-1, log=True),
    "learning_rate": FloatRange(1e-4, 1e-2, log=True),
}


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
    """Normalization -> [the features, ``layers`` x (Dense ``units`` + dropout)] -> linear, rescaled.

    The trainer passes the training targets' ``target_mean`` and ``target_std`` in
    ``hparams``; the last layer maps the standardised output back to the score scale,
    so the network learns on a unit scale and clients still get raw scores.
    """
    inputs = keras.Input(shape=(10,), name=INPUT_NAME)
    x = normalizer(inputs)
    deep = x
    for _ in range(int(hparams["layers"])):
        deep = dense_block(deep, int(hparams["units"]), hparams)
    joined = keras.layers.Concatenate()([x, deep]) if int(hparams["layers"]) else x
    x = keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(float(hparams["l2"])))(joined)
    outputs = keras.layers.Rescaling(
        scale=float(hparams.get("target_std", 1.0)),
        offset=float(hparams.get("target_mean", 0.0)),
        name=OUTPUT_NAME,
    )(x)
    return keras.Model(inputs, outputs, name="diabetes_wide_deep")
