"""A spec file with an unknown task type."""

TASK = "clustering"


def load_data():
    raise AssertionError("never called")


def build_model(normalizer, hparams):
    raise AssertionError("never called")
