"""Breast cancer diagnosis (Wisconsin, 30 features): binary classification.

The output is the probability of the positive class, ``benign`` (scikit-learn's 1).

On 569 rows a logistic regression is hard to beat: the classes are nearly linearly
separable. The model is therefore "wide and deep": the standardised features reach the
sigmoid both directly (the logistic regression inside the network) and through one small,
heavily regularised hidden layer, so the network can match the linear model and add what
the hidden layer finds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from modelloop.training.spec import Choice, Dataset, FloatRange, IntRange
from modelloop.training.specs._layers import dense_block

NAME = "breast-cancer"
TASK = "binary"
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
HPARAMS = {
    "epochs": 150,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "dropout": 0.5,
    "l2": 1e-2,
    "patience": 15,
    "units": 16,
    "layers": 1,
}
SEARCH_SPACE = {
    "units": Choice(8, 16, 32, 64),
    "layers": IntRange(0, 2),
    "dropout": FloatRange(0.0, 0.6),
    "l2": FloatRange(1e-4, 1e-1, log=True),
    "learning_rate": FloatRange(3e-4, 1e-2, log=True),
}


def load_data() -> Dataset:
    """Loads the 569 diagnoses bundled with scikit-learn."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return Dataset(
        x=bunch.data.astype(np.float32),
        y=bunch.target.astype(np.int64),
        feature_names=[str(n).replace(" ", "_") for n in bunch.feature_names],
        class_labels=[str(n) for n in bunch.target_names],
    )


def build_model(normalizer: keras.layers.Layer, hparams: Mapping[str, Any]) -> keras.Model:
    """Normalization -> [the features, ``layers`` x (Dense ``units`` + dropout)] -> sigmoid."""
    inputs = keras.Input(shape=(30,), name=INPUT_NAME)
    x = normalizer(inputs)
    deep = x
    for _ in range(int(hparams["layers"])):
        deep = dense_block(deep, int(hparams["units"]), hparams)
    joined = keras.layers.Concatenate()([x, deep]) if int(hparams["layers"]) else x
    outputs = keras.layers.Dense(
        1,
        activation="sigmoid",
        kernel_regularizer=keras.regularizers.L2(float(hparams["l2"])),
        name=OUTPUT_NAME,
    )(joined)
    return keras.Model(inputs, outputs, name="breast_cancer_wide_deep")
