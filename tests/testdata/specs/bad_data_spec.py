"""A spec whose loader returns the wrong type."""

TASK = "regression"


def load_data():
    return [[1.0, 2.0]]


def build_model(normalizer, hparams):
    raise AssertionError("never called")
