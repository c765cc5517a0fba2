"""Synthetic three-class blobs the test specs share (made here, nothing downloaded)."""

from __future__ import annotations

import numpy as np

from modelloop.training.spec import Dataset


def blobs() -> Dataset:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 0.0, 0.0], [0.0, 4.0, 4.0, 4.0]])
    y = np.repeat(np.arange(3), 100)
    x = centers[y] * 10.0 + rng.normal(scale=10.0, size=(300, 4)) + 100.0
    return Dataset(x.astype(np.float32), y, ["a", "b", "c", "d"], ["red", "green", "blue"])
