"""Drift statistics against known values, and the detector's verdicts."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from modelloop.monitoring.drift import DriftDetector, ks_statistic, ks_test, psi
from modelloop.training.baseline import bin_index
from tests.monitoring.monhelpers import DigitsData, drifted_digits


def test_psi_reference_vector():
    # monitoring-anchors.md 1.5 (VERIFIED values).
    assert psi([0.25] * 4, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.228217, abs=1e-6)


def test_psi_epsilon_for_an_empty_bin():
    assert psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2], eps=1e-4) == pytest.approx(1.564049, abs=1e-6)
    # Hand-computed: the empty bin's term is (0.2 - eps) * ln(0.2 / eps).
    eps = 1e-3
    expected = 2 * (-0.1) * np.log(0.4 / 0.5) + (0.2 - eps) * np.log(0.2 / eps)
    assert psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2], eps=eps) == pytest.approx(expected, rel=1e-12)


def test_psi_is_zero_for_equal_and_finite_for_disjoint():
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    value = psi([1.0, 0.0], [0.0, 1.0])
    assert np.isfinite(value) and value > 10


def test_psi_needs_the_same_bins():
    with pytest.raises(ValueError, match="same bins"):
        psi([0.5, 0.5], [1.0])


def test_ks_reference_vector():
    # monitoring-anchors.md 1.5: N(0,1) vs N(0.2,1), n=m=1000, rng seed 0 -> D=0.129, p=1.14e-7.
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 1000), rng.normal(0.2, 1.0, 1000)
    d, p = ks_test(a, b)
    assert d == pytest.approx(0.129, abs=5e-4)
    assert p == pytest.approx(1.14e-7, rel=0.02)
    assert ks_statistic(a, a) == 0.0


def _baseline(
    features: list[dict], sample: list[list[float]] | None = None, predictions: dict | None = None
) -> dict:
    return {
        "features": features,
        "reference_sample": sample or [],
        "predictions": predictions or {},
    }


def _feature(
    name: str, edges: list[float], props: list[float], constant: bool = False, value: float = 0.0
) -> dict:
    return {
        "name": name,
        "constant": constant,
        "min": value,
        "max": value,
        "edges": edges,
        "proportions": props,
    }


def test_psi_uses_the_baselines_bins():
    # Bin i counts the inner edges strictly below v (training.baseline.bin_index): 1.0 falls in bin 0.
    assert list(bin_index(np.array([0.5, 1.0, 1.5, 3.0]), np.array([1.0, 2.0]))) == [0, 0, 1, 2]
    detector = DriftDetector(_baseline([_feature("f", [1.0, 2.0], [0.5, 0.25, 0.25])]))
    rows = np.array([[1.0], [1.0], [1.5], [3.0]])  # shares 0.5, 0.25, 0.25 -> identical
    report = detector.evaluate(rows)
    assert report.features[0].psi == pytest.approx(0.0)
    assert not report.features[0].drifted
    shifted = detector.evaluate(np.array([[3.0], [3.0], [3.0], [1.5]]))  # 0, .25, .75
    expected = psi([0.5, 0.25, 0.25], [0.0, 0.25, 0.75])
    assert shifted.features[0].psi == pytest.approx(expected)
    assert shifted.features[0].drifted  # 0.5*ln(0.75/0.25) + ... > 0.2


def test_constant_features_drift_with_the_share_of_differing_values():
    detector = DriftDetector(_baseline([_feature("c", [], [1.0], constant=True, value=0.0)]))
    same = detector.evaluate(np.zeros((100, 1), np.float32))
    assert not same.features[0].drifted and same.features[0].psi == 0.0
    assert same.features[0].ks is None and same.features[0].constant
    one_off = np.zeros((100, 1))
    one_off[7, 0] = 3.0
    report = detector.evaluate(one_off)
    # PSI over equal/different: e = [1, eps], a = [0.99, 0.01]; one stray value is no drift.
    assert report.features[0].psi == pytest.approx(psi([1.0, 0.0], [0.99, 0.01]))
    assert report.features[0].psi == pytest.approx(
        0.0099 * np.log(0.01 / 1e-4) - 0.01 * np.log(0.99), rel=1e-9
    )
    assert not report.features[0].drifted
    five = np.zeros((100, 1))
    five[:5, 0] = 1.0  # 5 % differ: (0.05 - 1e-4) ln(500) + ... = 0.31 >= 0.2
    assert detector.evaluate(five).features[0].drifted
    # float32 round trips of a non-zero constant are not drift.
    const = DriftDetector(_baseline([_feature("c", [], [1.0], constant=True, value=0.1)]))
    assert not const.evaluate(np.full((10, 1), np.float32(0.1))).features[0].drifted


def test_drift_share_is_inclusive():
    features = [_feature(f"f{i}", [0.5], [0.5, 0.5]) for i in range(4)]
    rows = np.tile([0.0, 1.0], (50, 2))
    rows[:, 0] = 1.0  # f0 all in bin 1
    rows[:, 1] = 0.0  # f1 all in bin 0; f2, f3: half and half
    rows[:, 2] = np.repeat([0.0, 1.0], 25)
    rows[:, 3] = np.repeat([0.0, 1.0], 25)
    report = DriftDetector(_baseline(features), drift_share=0.5).evaluate(rows)
    assert report.n_drifted == 2 and report.share == 0.5
    assert report.drifted  # share >= drift_share
    assert not DriftDetector(_baseline(features), drift_share=0.75).evaluate(rows).drifted
    assert [f.name for f in report.top(2)] == ["f0", "f1"]


def test_ks_flags_a_shift_within_one_bin():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0.0, 1.0, 1000)
    baseline = _baseline([_feature("u", [], [1.0])], sample=ref[:, None].tolist())
    detector = DriftDetector(baseline, ks_pvalue=0.01)
    same = detector.evaluate(rng.uniform(0.0, 1.0, (500, 1)))
    moved = detector.evaluate(rng.uniform(0.3, 1.0, (500, 1)))
    assert same.features[0].psi == 0.0 and moved.features[0].psi == 0.0  # one bin: PSI is blind
    assert not same.features[0].drifted
    assert moved.features[0].drifted and moved.features[0].p_value < 1e-10


def test_prediction_drift_for_classes_and_values():
    classes = _baseline([_feature("f", [], [1.0])], predictions={"kind": "class", "proportions": [0.5, 0.5]})
    detector = DriftDetector(classes)
    assert detector.prediction_drift(np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    assert detector.prediction_drift(np.array([0, 0, 0, 1])) == pytest.approx(psi([0.5, 0.5], [0.75, 0.25]))
    # A class the baseline never predicted gets a bin of its own.
    assert detector.prediction_drift(np.array([2, 2])) == pytest.approx(psi([0.5, 0.5, 0.0], [0.0, 0.0, 1.0]))
    values = _baseline(
        [_feature("f", [], [1.0])], predictions={"kind": "binned", "edges": [10.0], "proportions": [0.5, 0.5]}
    )
    assert DriftDetector(values).prediction_drift(np.array([1.0, 20.0, 30.0, 40.0])) == pytest.approx(
        psi([0.5, 0.5], [0.25, 0.75])
    )
    assert detector.prediction_drift(np.array([])) is None


def test_bad_windows_and_baselines_are_refused():
    detector = DriftDetector(_baseline([_feature("f", [], [1.0])]))
    with pytest.raises(ValueError, match="1 features"):
        detector.evaluate(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no features"):
        DriftDetector({"predictions": {}})
    # An empty list is a model without numeric inputs (strings): prediction drift only, and a
    # window of numeric rows does not fit it.
    with pytest.raises(ValueError, match="0 features"):
        DriftDetector({"features": []}).evaluate(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="edges"):
        DriftDetector(_baseline([_feature("f", [1.0], [1.0])]))


def test_digits_normal_and_drifted_traffic(digits_data: DigitsData):
    """Held-out digits do not drift; inverted noisy digits do. Prints the numbers."""
    detector = DriftDetector(digits_data.baseline)
    window = slice(0, 1000)
    normal_rows = digits_data.x_new[window]
    drifted_rows = drifted_digits(normal_rows)
    normal = detector.evaluate(normal_rows, digits_data.y_new[window])
    # The inverted digits' "predictions": a collapse onto a few classes.
    drifted = detector.evaluate(drifted_rows, np.zeros(len(drifted_rows), np.int64))
    for label, report in (("normal", normal), ("drifted", drifted)):
        top = ", ".join(f"{f.name} psi={f.psi:.3f}" for f in report.top(3))
        print(
            f"\ndigits {label}: rows={report.rows} drifted={report.drifted} share={report.share:.3f} "
            f"({report.n_drifted}/{len(report.features)}) prediction_psi={report.prediction_psi:.3f} "
            f"max_psi={max(f.psi for f in report.features):.3f} top: {top}"
        )
    assert not normal.drifted and normal.share < 0.2
    assert normal.prediction_psi is not None and normal.prediction_psi < 0.05
    assert max(f.psi for f in normal.features) < 0.2
    assert drifted.drifted and drifted.share > 0.8
    assert drifted.prediction_psi is not None and drifted.prediction_psi > 1.0
    # Training-constant pixels (always 0 in digits) drift under noise.
    constants = [f for f in drifted.features if f.constant]
    assert constants and all(f.drifted for f in constants)
    assert not any(f.drifted for f in normal.features if f.constant)


def test_detector_does_not_mutate_the_baseline(digits_data: DigitsData):
    before = copy.deepcopy(digits_data.baseline["features"][:3])
    DriftDetector(digits_data.baseline).evaluate(digits_data.x_new[:300])
    assert digits_data.baseline["features"][:3] == before
