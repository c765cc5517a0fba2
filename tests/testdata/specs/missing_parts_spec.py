"""A spec file without build_model."""

TASK = "multiclass"


def load_data():
    raise AssertionError("never called")
