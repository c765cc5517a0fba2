"""The label-free accuracy estimate (CBPE): a worked example by hand, the band, and what it refuses.

NannyML's CBPE is the reference implementation; ``python -m bench.estimation_harness``
runs it beside this estimator on the same windows, from a virtualenv of its own. Here the
cross-check is the worked example below, computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelloop.monitoring.estimation import Z_95, AccuracyEstimator, accuracy_band

IDENTITY = {"method": "temperature", "temperature": 1.0}


def test_worked_example_by_hand() -> None:
    # Four rows, two classes, an identity calibrator (temperature 1):
    #   row  outputs      predicted  q (probability the prediction is right)
    #   0    0.9 0.1      0          0.9
    #   1    0.6 0.4      0          0.6
    #   2    0.2 0.8      1          0.8
    #   3    0.5 0.5      0 (argmax) 0.5
    # estimate = (0.9 + 0.6 + 0.8 + 0.5) / 4 = 0.7
    # variance of the realized accuracy = Σ q(1 − q) / n² = (0.09 + 0.24 + 0.16 + 0.25) / 16
    #   = 0.74 / 16; half band = 1.959964 · 0.860233 / 4 = 0.421506
    estimator = AccuracyEstimator(IDENTITY, "multiclass")
    report = estimator.estimate(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]]))
    assert report is not None
    assert report.value == pytest.approx(0.7)
    assert report.lower == pytest.approx(0.7 - 0.421506, abs=1e-6)
    assert report.upper == 1.0  # 1.121506, clipped
    assert report.rows == 4 and report.method == "temperature"


def test_worked_example_with_a_temperature() -> None:
    # T = 2 takes the square root of each probability before renormalising:
    # [0.8, 0.2] -> [sqrt(.8), sqrt(.2)] / (sqrt(.8) + sqrt(.2)) = [2/3, 1/3].
    # [0.1, 0.9] -> [1/4, 3/4].  estimate = (2/3 + 3/4) / 2 = 17/24.
    estimator = AccuracyEstimator({"method": "temperature", "temperature": 2.0}, "multiclass")
    report = estimator.estimate(np.array([[0.8, 0.2], [0.1, 0.9]]))
    assert report is not None
    assert report.value == pytest.approx(17 / 24)
    q = np.array([2 / 3, 3 / 4])
    assert report.lower == pytest.approx(17 / 24 - Z_95 * math.sqrt(np.sum(q * (1 - q))) / 2)


def test_a_sigmoid_binary_model() -> None:
    # p(class 1) = 0.9 -> predicted 1, q = 0.9; p = 0.3 -> predicted 0, q = 0.7.
    report = AccuracyEstimator(IDENTITY, "binary").estimate(np.array([[0.9], [0.3]]))
    assert report is not None and report.value == pytest.approx(0.8)


def test_the_band_narrows_with_the_window() -> None:
    estimator = AccuracyEstimator(IDENTITY, "multiclass")
    row = np.array([[0.9, 0.1]])
    small = estimator.estimate(np.repeat(row, 100, axis=0))
    large = estimator.estimate(np.repeat(row, 10_000, axis=0))
    assert small is not None and large is not None
    assert small.value == pytest.approx(large.value)
    # Ten times narrower for a hundred times the rows: 1.96 · 0.3 / sqrt(n).
    assert small.upper - small.lower == pytest.approx(2 * Z_95 * 0.3 / 10)
    assert large.upper - large.lower == pytest.approx(2 * Z_95 * 0.3 / 100)


def test_non_finite_outputs_are_left_out() -> None:
    estimator = AccuracyEstimator(IDENTITY, "multiclass")
    report = estimator.estimate(np.array([[0.9, 0.1], [np.nan, 0.5]]))
    assert report is not None and report.rows == 1 and report.value == pytest.approx(0.9)
    assert estimator.estimate(np.array([[np.nan, np.nan]])) is None


@pytest.mark.parametrize(
    ("baseline", "task", "reason"),
    [
        ({"calibration": IDENTITY}, "regression", "no label-free estimate for regressors"),
        (None, "multiclass", "no baseline"),
        ({"features": []}, "multiclass", "the baseline has no calibrator"),
        ({"calibration": {"method": "platt"}}, "multiclass", "unknown calibration method 'platt'"),
    ],
)
def test_no_estimate_is_said_plainly(baseline: dict | None, task: str, reason: str) -> None:
    estimator = AccuracyEstimator.from_baseline(baseline, task=task)
    assert not estimator.available
    assert reason in estimator.reason
    assert estimator.estimate(np.array([[0.9, 0.1]])) is None


def test_a_calibrator_for_other_classes_is_an_error() -> None:
    isotonic = {"method": "isotonic", "classes": [{"x": [0.0, 1.0], "y": [0.0, 1.0]}] * 3}
    with pytest.raises(ValueError, match="3 classes"):
        AccuracyEstimator(isotonic, "multiclass").estimate(np.array([[0.9, 0.1]]))


def test_a_baseline_that_keeps_raw_probabilities_estimates_with_them() -> None:
    calibration = {"method": "none", "held_out": {"ece_before": 0.01, "ece_after": 0.01}}
    estimator = AccuracyEstimator.from_baseline({"calibration": calibration}, task="multiclass")
    assert estimator.available and estimator.calibration_error == 0.01
    report = estimator.estimate(np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert report is not None and report.method == "none"
    assert report.value == pytest.approx(0.85)
    half = Z_95 * math.sqrt((0.09 + 0.16) / 4 + 0.01**2)
    assert (report.lower, report.upper) == pytest.approx((0.85 - half, min(1.0, 0.85 + half)))


def test_an_old_baseline_without_held_out_errors_keeps_the_sampling_band() -> None:
    assert AccuracyEstimator(IDENTITY, "multiclass").calibration_error == 0.0
    q = np.full(100, 0.9)
    assert accuracy_band(q) == pytest.approx((0.9 - Z_95 * 0.03, 0.9 + Z_95 * 0.03))


def _coverage(bias: float, calibration_error: float, windows: int = 400, n: int = 400) -> float:
    """Share of windows whose realized accuracy is inside the band.

    The calibrated probabilities of digits-like traffic (most rows sure, a tail unsure)
    overstate the true chance of being right by ``bias``: a calibrator as far off as its
    held-out error says.
    """
    rng = np.random.default_rng(0)
    inside = 0
    for _ in range(windows):
        q = np.where(rng.random(n) < 0.9, rng.uniform(0.97, 1.0, n), rng.uniform(0.5, 0.97, n))
        realized = float(np.mean(rng.random(n) < np.clip(q - bias, 0.0, 1.0)))
        lower, upper = accuracy_band(q, calibration_error)
        inside += lower <= realized <= upper
    return inside / windows


def test_the_band_holds_when_it_counts_the_calibration_error() -> None:
    # Exact probabilities: the sampling term alone covers about 95 %.
    assert _coverage(bias=0.0, calibration_error=0.0) >= 0.9
    # Probabilities 0.012 too high: the sampling band misses a third of the windows, the
    # band that counts a held-out error of 0.012 holds (>= 17 of 20 windows, the target).
    assert _coverage(bias=0.012, calibration_error=0.0) < 0.8
    assert _coverage(bias=0.012, calibration_error=0.012) >= 0.9
    assert _coverage(bias=-0.012, calibration_error=0.012) >= 0.9
