"""Breast cancer diagnosis (Wisconsin, 30 features): binary classification.

The output is the probability of the positive class, ``benign`` (scikit-learn's 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from modelloop.training.spec import Dataset

NAME = "breast-cancer"
TASK = "binary"
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
HPARAMS = {"epochs": 100, "dropout": 0.3, "l2": 1e-3, "patience": 12}


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
    """A Sequential MLP: Normalization -> Dense 32 + dropout -> sigmoid."""
    return keras.Sequential(
        [
            keras.Input(shape=(30,), name=INPUT_NAME),
            normalizer,
            keras.layers.Dense(
                32, activation="relu", kernel_regularizer=keras.regularizers.L2(float(hparams["l2"]))
            ),
            keras.layers.Dropout(float(hparams["dropout"])),
            keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME),
        ],
        name="breast_cancer_mlp",
    )
