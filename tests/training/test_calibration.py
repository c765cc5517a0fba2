"""The calibrator that training stores for label-free accuracy estimates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modelloop.training.baseline import build_baseline
from modelloop.training.calibration import (
    calibrate,
    class_probabilities,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    predicted_classes,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n: int, seed: int, sharpen: float = 2.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the "model" answers softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.2, size=(n, 5))
    truth = softmax(z)
    y = np.array([rng.choice(5, p=p) for p in truth])
    return softmax(sharpen * z), y, truth


def test_temperature_scaling_recovers_the_sharpening() -> None:
    outputs, y, _ = overconfident(6000, seed=1, sharpen=2.5)
    assert fit_temperature(class_probabilities(outputs, "multiclass"), y) == pytest.approx(2.5, rel=0.1)


def test_calibration_lowers_the_ece_and_keeps_the_predicted_class() -> None:
    outputs, y, _ = overconfident(3000, seed=2)
    for method in ("temperature", "isotonic"):
        entry = fit_calibration(outputs, y, task="multiclass", method=method)
        calibrated = calibrate(entry, outputs, "multiclass")
        assert np.allclose(calibrated.sum(axis=1), 1.0)
        assert entry["validation"]["ece_after"] < entry["validation"]["ece_before"] / 2, method
        # The estimate on the fitting rows is the accuracy there, to a few points.
        v = entry["validation"]
        assert abs(v["estimated_accuracy"] - v["accuracy"]) < 0.02, method
        json.dumps(entry)  # it goes into baseline.json
    temperature = fit_calibration(outputs, y, task="multiclass", method="temperature")
    assert (calibrate(temperature, outputs, "multiclass").argmax(axis=1) == outputs.argmax(axis=1)).all()


def test_auto_keeps_temperature_on_a_small_split_and_chooses_on_a_large_one() -> None:
    small, y_small, _ = overconfident(60, seed=3)
    assert fit_calibration(small, y_small, task="multiclass")["method"] == "temperature"
    large, y_large, _ = overconfident(3000, seed=4)
    entry = fit_calibration(large, y_large, task="multiclass")
    nll = entry["validation"]["held_out_nll"]
    assert set(nll) == {"temperature", "isotonic"}
    assert entry["method"] == min(nll, key=nll.get)


def test_a_binary_sigmoid_model_is_calibrated_as_two_classes() -> None:
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-z))).astype(int)
    outputs = (1 / (1 + np.exp(-3 * z))).reshape(-1, 1)  # three times too sure
    entry = fit_calibration(outputs, y, task="binary", method="temperature")
    assert entry["temperature"] == pytest.approx(3.0, rel=0.15)
    probs = calibrate(entry, outputs, "binary")
    assert probs.shape == (2000, 2)
    assert (predicted_classes(outputs) == (outputs[:, 0] >= 0.5)).all()


def test_ece_by_hand() -> None:
    # Two rows at confidence 0.9 (one right), two at 0.6 (both right):
    # 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.6| = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"method": "platt"}, "unknown calibration method"),
        ({"method": "temperature", "temperature": 0.0}, "must be > 0"),
        ({"method": "isotonic", "classes": [{"x": [0, 1], "y": [0, 1]}]}, "1 classes; the outputs have 3"),
    ],
)
def test_a_bad_calibrator_is_refused_with_its_reason(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate(entry, np.full((2, 3), 1 / 3), "multiclass")


def test_bad_labels_are_refused() -> None:
    with pytest.raises(ValueError, match=r"class ids 0\.\.2"):
        fit_calibration(np.full((3, 3), 1 / 3), np.array([0, 1, 3]), task="multiclass")
    with pytest.raises(ValueError, match="one label per output row"):
        fit_calibration(np.full((3, 3), 1 / 3), np.array([0, 1]), task="multiclass")


def test_the_baseline_stores_a_calibrator_for_classifiers_only() -> None:
    outputs, y, _ = overconfident(300, seed=6)
    x = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    common = {"x_train": x, "feature_names": ["a", "b"], "input_name": "x", "seed": 0}
    with_targets = build_baseline(
        **common, task="multiclass", val_outputs=outputs, class_labels=list("abcde"), val_targets=y
    )
    assert with_targets["calibration"]["method"] == "temperature"
    without = build_baseline(**common, task="multiclass", val_outputs=outputs, class_labels=list("abcde"))
    assert "calibration" not in without
    regression = build_baseline(
        **common, task="regression", val_outputs=x[:, :1], class_labels=[], val_targets=x[:, 0]
    )
    assert "calibration" not in regression
