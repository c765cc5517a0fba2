"""Data quality per feature: missing, out of range, became constant."""

from __future__ import annotations

import numpy as np
import pytest

from modelloop.monitoring.quality import QualityChecker
from modelloop.training.baseline import build_baseline
from tests.monitoring.monhelpers import DigitsData, drifted_digits


def _baseline(x: np.ndarray) -> dict:
    return build_baseline(
        x_train=x,
        feature_names=[f"f{i}" for i in range(x.shape[1])],
        input_name="x",
        task="regression",
        val_outputs=x[:, :1],
        class_labels=[],
        seed=0,
    )


def test_shares_by_hand() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(0, 10, 500), rng.uniform(-1, 1, 500), np.full(500, 3.0)])
    checker = QualityChecker(_baseline(x))
    window = np.array(
        [
            [5.0, 0.0, 3.0],
            [np.nan, 0.0, 3.0],
            [np.inf, 2.0, 3.0],  # f1 above its max
            [11.0, -0.5, 4.0],  # f0 above, f2 differs from its constant
        ]
    )
    report = checker.evaluate(window)
    f0, f1, f2 = report.features
    assert f0.missing_share == 0.5 and f0.out_of_range_share == 0.25
    assert f1.missing_share == 0.0 and f1.out_of_range_share == 0.25
    assert f2.out_of_range_share == 0.25 and not f2.became_constant
    assert report.max_missing_share == 0.5
    assert [f.name for f in report.worst("missing_share")] == ["f0"]


def test_held_out_digits_are_clean_and_inverted_digits_are_not(digits_data: DigitsData) -> None:
    checker = QualityChecker(digits_data.baseline)
    normal = checker.evaluate(digits_data.x_new)
    assert normal.max_missing_share == 0.0
    assert normal.max_out_of_range_share < 0.01  # a few pixels past the training maximum
    assert normal.became_constant == []
    drifted = checker.evaluate(drifted_digits(digits_data.x_new))
    assert drifted.max_out_of_range_share > 0.5


def test_became_constant_needs_an_improbable_constant_window(digits_data: DigitsData) -> None:
    checker = QualityChecker(digits_data.baseline)
    names = checker.names
    busy = names.index("pixel_3_3")  # inked in most digits
    rare = max(
        (i for i, f in enumerate(digits_data.baseline["features"]) if not f["constant"]),
        key=lambda i: max(digits_data.baseline["features"][i]["proportions"]),
    )
    window = digits_data.x_new[:400].copy()
    window[:, busy] = 7.0
    window[:, rare] = 0.0
    report = checker.evaluate(window)
    assert names[busy] in report.became_constant
    # A feature that is nearly always zero in training is zero over 400 rows by chance too.
    assert names[rare] not in report.became_constant
    # Over 3 rows nothing is improbable enough.
    assert checker.evaluate(window[:3]).became_constant == []


def test_a_window_of_another_width_is_refused(digits_data: DigitsData) -> None:
    with pytest.raises(ValueError, match="64 features"):
        QualityChecker(digits_data.baseline).evaluate(np.zeros((5, 3)))
