"""Perturbations of the test rows and the scores under them."""

from __future__ import annotations

import numpy as np
import pytest

from modelloop.training.preprocessing import fit_scaling
from modelloop.training.robustness import (
    CURVE_LEVELS,
    NOISE_LEVELS,
    gaussian_noise,
    out_of_range,
    perturbation_suite,
    robustness_report,
    stray_pixel,
)


def _pixels(n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 17, size=(n, 6)).astype(np.float32)
    x[:, 0] = 0.0  # constant in training, like pixel_0_0
    return x


def test_noise_is_scaled_to_each_range_and_clipped_to_it():
    x = np.full((20_000, 2), 5.0, dtype=np.float32)
    low, high = np.array([0.0, 0.0]), np.array([10.0, 100.0])
    noisy = gaussian_noise(x, low, high, 0.1, np.random.default_rng(0))
    assert noisy.min() >= 0.0 and noisy[:, 0].max() <= 10.0
    assert noisy[:, 0].std() == pytest.approx(1.0, rel=0.05)  # 0.1 x range 10, barely clipped
    assert noisy[:, 1].std() < 10.0  # 0.1 x range 100, clipped at 0 well within one sigma
    again = gaussian_noise(x, low, high, 0.1, np.random.default_rng(0))
    assert np.array_equal(noisy, again)


def test_out_of_range_moves_a_constant_feature_off_its_constant():
    x = _pixels()
    scaling = fit_scaling(x)
    rows, described = out_of_range(x[:10], scaling, list("abcdef"), np.random.default_rng(0))
    assert described["constant_in_training"] is True and described["features"] == ["a"]
    assert described["offset"] == 16.0  # the typical range of the other features
    assert (rows[:, 0] == 16.0).all()
    assert np.array_equal(rows[:, 1:], x[:10, 1:])


def test_out_of_range_without_constant_features_uses_the_nearest_to_constant():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 1, 300), np.r_[np.zeros(299), 5.0]], axis=1).astype(np.float32)
    rows, described = out_of_range(x[:5], fit_scaling(x), ["wide", "spiky"], rng)
    assert described == {"features": ["spiky"], "constant_in_training": False, "value": 10.0}
    assert (rows[:, 1] == 10.0).all() and np.array_equal(rows[:, 0], x[:5, 0])


def test_stray_pixel_changes_one_pixel_per_row():
    x = np.zeros((50, 64), dtype=np.float32)
    rows = stray_pixel(x, 16.0, np.random.default_rng(0))
    assert ((rows != x).sum(axis=1) == 1).all()
    assert set(np.unique(rows).tolist()) == {0.0, 16.0}


def test_suite_has_the_task_s_perturbations():
    x = _pixels()
    image = perturbation_suite(x, fit_scaling(x, (0.0, 16.0)), list("abcdef"), image=True, seed=1)
    tabular = perturbation_suite(x, fit_scaling(x), list("abcdef"), image=False, seed=1)
    noise = [f"noise_{level:g}" for level in NOISE_LEVELS]
    assert list(image.sets) == [*noise, "out_of_range", "stray_pixel"]
    assert list(tabular.sets) == [*noise, "out_of_range"]
    assert list(image.curve) == list(CURVE_LEVELS) and np.array_equal(image.curve[0.0], x)
    # Image noise uses the pixel range, so the blank pixel gets ink; tabular noise uses the
    # training range, which is zero for a constant feature.
    assert image.sets["noise_0.125"][:, 0].max() > 0 and (tabular.sets["noise_0.125"][:, 0] == 0).all()
    again = perturbation_suite(x, fit_scaling(x, (0.0, 16.0)), list("abcdef"), image=True, seed=1)
    assert all(np.array_equal(image.sets[k], again.sets[k]) for k in image.sets)


def test_report_scores_every_predictor_on_the_same_rows():
    x = _pixels()
    y = (x[:, 1] > 8).astype(np.int64)
    suite = perturbation_suite(x, fit_scaling(x, (0.0, 16.0)), list("abcdef"), image=True, seed=0)

    def by_pixel_1(rows: np.ndarray) -> np.ndarray:
        p = (rows[:, 1] > 8).astype(np.float32)
        return np.stack([1 - p, p], axis=1)

    def by_pixel_0(rows: np.ndarray) -> np.ndarray:
        p = (rows[:, 0] > 0).astype(np.float32)  # fooled by any ink on the blank pixel
        return np.stack([1 - p, p], axis=1)

    report = robustness_report("multiclass", y, suite, {"model": by_pixel_1, "fragile": by_pixel_0})
    assert report["curve"]["model"][0] == 1.0
    assert report["curve"]["levels"] == list(CURVE_LEVELS) and report["curve"]["metric"] == "accuracy"
    assert report["scores"]["model"]["out_of_range"]["accuracy"] == 1.0  # ignores pixel 0
    assert report["scores"]["fragile"]["out_of_range"]["accuracy"] == pytest.approx(y.mean())
    assert report["scores"]["model"]["noise_0.125"]["accuracy"] < 1.0  # noise moves pixel 1 across 8
    assert set(report["perturbations"]) == set(suite.sets)
