"""A user spec built with the Sequential API."""

import sys
from pathlib import Path

import keras

sys.path.insert(0, str(Path(__file__).parent))
from _blobs import blobs

TASK = "multiclass"
INPUT_NAME = "measurements"
OUTPUT_NAME = "scores"
HPARAMS = {"epochs": 20, "patience": 5, "learning_rate": 1e-2}


def load_data():
    return blobs()


def build_model(normalizer, hparams):
    return keras.Sequential(
        [
            keras.Input(shape=(4,)),
            normalizer,
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(hparams["dropout"]),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
