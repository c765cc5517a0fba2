"""A user spec whose model crashes inside ``fit``: a retrain with it must fail and publish nothing."""

import sys
from pathlib import Path

import keras

sys.path.insert(0, str(Path(__file__).parent))
from _blobs import blobs

NAME = "blobs-crash"
TASK = "multiclass"
HPARAMS = {"epochs": 3, "patience": 2}


class CrashingModel(keras.Model):
    """Builds and predicts like any model; its training step raises, as a crash midway would."""

    def train_step(self, data):
        raise RuntimeError("training crashed on purpose (test spec)")


def load_data():
    return blobs()


def build_model(normalizer, hparams):
    inputs = keras.Input(shape=(4,))
    x = keras.layers.Dense(8, activation="relu")(normalizer(inputs))
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return CrashingModel(inputs, outputs)
