"""A user spec built with the Functional API, with two branches merged."""

import sys
from pathlib import Path

import keras

sys.path.insert(0, str(Path(__file__).parent))
from _blobs import blobs

NAME = "blobs-functional"
TASK = "multiclass"
HPARAMS = {"epochs": 20, "patience": 5, "learning_rate": 1e-2}


def load_data():
    return blobs()


def build_model(normalizer, hparams):
    inputs = keras.Input(shape=(4,))
    x = normalizer(inputs)
    a = keras.layers.Dense(8, activation="relu")(x)
    b = keras.layers.Dense(8, activation="tanh")(x)
    x = keras.layers.Concatenate()([a, b])
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)
