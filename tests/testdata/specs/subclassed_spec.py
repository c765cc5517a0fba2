"""A user spec whose model is a subclassed keras.Model."""

import sys
from pathlib import Path

import keras

sys.path.insert(0, str(Path(__file__).parent))
from _blobs import blobs

TASK = "multiclass"
HPARAMS = {"epochs": 20, "patience": 5, "learning_rate": 1e-2}


@keras.saving.register_keras_serializable(package="modelloop_tests")
class BlobNet(keras.Model):
    def __init__(self, normalizer, units=16, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.normalizer = normalizer
        self.units = units
        self.dropout_rate = dropout
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.drop = keras.layers.Dropout(dropout)
        self.head = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs, training=False):
        x = self.normalizer(inputs)
        x = self.drop(self.hidden(x), training=training)
        return self.head(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            normalizer=keras.saving.serialize_keras_object(self.normalizer),
            units=self.units,
            dropout=self.dropout_rate,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config["normalizer"] = keras.saving.deserialize_keras_object(config["normalizer"])
        return cls(**config)


def load_data():
    return blobs()


def build_model(normalizer, hparams):
    model = BlobNet(normalizer, dropout=hparams["dropout"])
    model(keras.ops.zeros((1, 4)))  # creates the weights
    return model
