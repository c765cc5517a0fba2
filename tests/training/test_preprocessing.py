"""Input scaling: a floor for (near-)constant features, the pixel range for images, inside the model."""

from __future__ import annotations

import numpy as np
import pytest

from modelloop.training.preprocessing import SCALE_FLOOR, fit_scaling


def _rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    n = 2000
    normal = rng.normal(10.0, 2.0, size=n)
    constant = np.full(n, 3.0)
    sparse = np.zeros(n)
    sparse[:1] = 4.0  # inked in 1 row of 2000: std ~0.09, range 4
    return np.stack([normal, constant, sparse], axis=1).astype(np.float32)


def test_only_near_constant_features_are_floored():
    x = _rows()
    scaling = fit_scaling(x)
    assert scaling.kind == "standardize"
    assert scaling.floored.tolist() == [False, True, True]
    assert scaling.scale[0] == pytest.approx(x[:, 0].std(), rel=1e-6)  # an ordinary feature keeps its std
    assert scaling.scale[1] == 1.0  # constant: passes through centred, as StandardScaler does
    assert scaling.scale[2] == pytest.approx(SCALE_FLOOR * 4.0)
    assert scaling.offset[1] == pytest.approx(3.0)


def test_the_floor_bounds_what_one_stray_value_becomes():
    x = _rows()
    stray = np.array([[10.0, 3.0, 4.0]], dtype=np.float32)
    floored = fit_scaling(x).transform(stray)[0, 2]
    unfloored = (4.0 - x[:, 2].mean()) / x[:, 2].std()
    assert floored <= 1.0 / SCALE_FLOOR
    assert unfloored > 2 * floored  # what the plain standardisation made of it


def test_pixel_range_ignores_the_training_statistics():
    x = np.zeros((50, 4), dtype=np.float32)
    x[:, 1] = np.linspace(0, 8, 50)
    scaling = fit_scaling(x, pixel_range=(0.0, 16.0))
    assert scaling.kind == "pixel_range"
    assert scaling.offset.tolist() == [0.0] * 4 and scaling.scale.tolist() == [16.0] * 4
    assert scaling.low.tolist() == [0.0] * 4 and scaling.high.tolist() == [16.0] * 4
    assert not scaling.floored.any()
    assert scaling.constant.tolist() == [True, False, True, True]  # still known, for the perturbations
    assert scaling.transform(np.full((1, 4), 16.0)).tolist() == [[1.0] * 4]


def test_the_keras_layer_scales_as_transform_does():
    x = _rows()
    scaling = fit_scaling(x)
    layer = scaling.layer()
    rows = np.array([[12.0, 3.0, 0.0], [7.0, 9.0, 4.0]], dtype=np.float32)
    assert layer.name == "normalization"
    np.testing.assert_allclose(np.asarray(layer(rows)), scaling.transform(rows), rtol=1e-5, atol=1e-5)


def test_describe_names_the_floored_features():
    described = fit_scaling(_rows()).describe(["a", "b", "c"])
    assert described == {"kind": "standardize", "scale_floor": SCALE_FLOOR, "floored": ["b", "c"]}
    assert fit_scaling(_rows(), (0.0, 16.0)).describe(["a", "b", "c"])["floored"] == []
