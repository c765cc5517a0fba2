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
    select_calibration,
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


def calibrated(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A confident, well-calibrated "model": labels drawn from exactly the probabilities it answers."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, size=(n, classes))
    z[np.arange(n), rng.integers(0, classes, n)] += 6.0
    probs = softmax(z)
    y = np.array([rng.choice(classes, p=p) for p in probs])
    return probs, y


def test_calibration_lowers_the_ece_and_keeps_the_predicted_class() -> None:
    outputs, y, _ = overconfident(3000, seed=2)
    for method in ("temperature", "isotonic"):
        entry = fit_calibration(outputs, y, task="multiclass", method=method)
        probs = calibrate(entry, outputs, "multiclass")
        assert np.allclose(probs.sum(axis=1), 1.0)
        held = entry["held_out"]
        assert held["ece"][method] < held["ece_before"] / 2, method
        # The estimate on the fitting rows is the accuracy there, to a few points.
        fit = entry["fit"]
        assert abs(fit["estimated_accuracy"] - fit["accuracy"]) < 0.02, method
        json.dumps(entry)  # it goes into baseline.json
    temperature = fit_calibration(outputs, y, task="multiclass", method="temperature")
    assert (calibrate(temperature, outputs, "multiclass").argmax(axis=1) == outputs.argmax(axis=1)).all()


def test_auto_calibrates_an_overconfident_model_where_held_out_folds_say_it_helps() -> None:
    outputs, y, _ = overconfident(3000, seed=4)
    entry = fit_calibration(outputs, y, task="multiclass", fitted_on="test split")
    held = entry["held_out"]
    assert set(held["ece"]) == {"none", "temperature", "isotonic"}
    assert entry["method"] == min(held["ece"], key=held["ece"].get) != "none"
    assert held["ece_after"] == held["ece"][entry["method"]] < held["ece_before"] / 2
    assert held["bias_before"] > 0.05 and abs(held["bias_after"]) < 0.02  # it was overconfident
    assert entry["fitted_on"] == "test split" and entry["rows"] == 3000
    assert (held["folds"], held["repeats"]) == (5, 2)


@pytest.mark.parametrize("rows", [300, 1500])
def test_auto_keeps_raw_probabilities_that_are_already_calibrated(rows: int) -> None:
    # A few hundred confident rows with a handful of errors, as digits' calibration rows:
    # a calibrator fitted there learns noise, and the held-out folds show it.
    outputs, y = calibrated(rows, seed=rows)
    entry = fit_calibration(outputs, y, task="multiclass")
    assert entry["method"] == "none"
    held = entry["held_out"]
    assert held["ece_after"] == held["ece_before"] == held["ece"]["none"]
    # Temperature may look a little better on these rows by chance; that is not enough.
    assert "temperature" in held["ece"]
    assert np.array_equal(calibrate(entry, outputs, "multiclass"), class_probabilities(outputs, "multiclass"))


def test_isotonic_calibrates_only_the_classes_it_helps_on_held_out_folds() -> None:
    # Class 0's probability is halved in the answers (under-confident on 0); the other
    # classes are answered as they are.
    rng = np.random.default_rng(8)
    truth = softmax(rng.normal(0.0, 1.5, size=(4000, 4)))
    y = np.array([rng.choice(4, p=p) for p in truth])
    answered = truth.copy()
    answered[:, 0] *= 0.5
    answered /= answered.sum(axis=1, keepdims=True)
    method, classes, _ = select_calibration(answered, y, task="multiclass")
    assert 0 in classes
    forced = fit_calibration(answered, y, task="multiclass", method="isotonic")
    assert forced["calibrated_classes"] == [0, 1, 2, 3]
    if method == "isotonic":
        entry = fit_calibration(answered, y, task="multiclass")
        for c, knots in enumerate(entry["classes"]):
            assert (knots == {"x": [0.0, 1.0], "y": [0.0, 1.0]}) == (c not in classes)


def test_tiny_splits_keep_raw_probabilities_or_try_temperature_only() -> None:
    outputs, y, _ = overconfident(60, seed=3)
    entry = fit_calibration(outputs, y, task="multiclass")
    assert set(entry["held_out"]["ece"]) == {"none", "temperature"}
    assert entry["method"] in ("none", "temperature")
    tiny = fit_calibration(outputs[:8], y[:8], task="multiclass")
    assert tiny["method"] == "none" and tiny["rows"] == 8


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
        ({"method": "platt"}, "unknown calibration method 'platt'; expected 'none', 'temperature'"),
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
    assert with_targets["calibration"]["fitted_on"] == "validation"
    held_out = build_baseline(
        **common,
        task="multiclass",
        val_outputs=outputs,
        class_labels=list("abcde"),
        calibration_outputs=outputs[:200],
        calibration_targets=y[:200],
        calibration_rows="test split",
    )
    assert held_out["calibration"]["fitted_on"] == "test split" and held_out["calibration"]["rows"] == 200
    without = build_baseline(**common, task="multiclass", val_outputs=outputs, class_labels=list("abcde"))
    assert "calibration" not in without
    regression = build_baseline(
        **common, task="regression", val_outputs=x[:, :1], class_labels=[], val_targets=x[:, 0]
    )
    assert "calibration" not in regression
