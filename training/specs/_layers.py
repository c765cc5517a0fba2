"""Small helpers the built-in model builders share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras


def dense_block(x: Any, units: int, hparams: Mapping[str, Any]) -> Any:
    """A ReLU dense layer with L2 weight decay, followed by dropout."""
    x = keras.layers.Dense(
        units,
        activation="relu",
        kernel_regularizer=keras.regularizers.L2(float(hparams["l2"])),
    )(x)
    return keras.layers.Dropout(float(hparams["dropout"]))(x)
