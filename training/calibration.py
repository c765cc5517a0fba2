"""Calibrated class probabilities for label-free accuracy estimation (CBPE).

A classifier's softmax is usually over-confident. Training fits a calibrator on the
validation split (rows the weights never saw) and stores it in ``baseline.json`` under
``"calibration"``; monitoring applies it to served outputs and averages the calibrated
probability of each predicted class: that mean is the expected accuracy of the window
(confidence-based performance estimation, as NannyML's CBPE does).

Two methods, one JSON shape each:

- **Temperature scaling** (``{"method": "temperature", "temperature": T}``): the class
  probabilities become ``softmax(log p / T)``. One parameter, so it cannot overfit a
  small validation split, and it keeps the predicted class.
- **Isotonic per class** (``{"method": "isotonic", "classes": [{"x": [...], "y": [...]}, ...]}``):
  one-vs-rest isotonic regression of "the row is class c" on ``p_c``, applied by linear
  interpolation between the fitted knots, then renormalised so each row sums to 1.

:func:`fit_calibration` fits both, scores each by negative log-likelihood with 5-fold
cross-fitting on the validation rows, and keeps the better one; a split too small or
with one class only gets temperature scaling (isotonic needs both outcomes per class).
Applying a calibrator needs numpy only.

Example:

```python
calibration = fit_calibration(val_outputs, y_val, task="multiclass")
probs = calibrate(calibration, served_outputs, task="multiclass")
predicted = served_outputs.argmax(axis=1)
expected_accuracy = probs[np.arange(len(probs)), predicted].mean()
```
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Probabilities are clipped away from 0 and 1 before a log: a softmax may round to 0.
_EPS = 1e-7
# Temperature search range (log-space): wide enough for any sane network.
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
# Isotonic knots kept per class; the fitted step function has at most one per distinct score.
_MAX_KNOTS = 200
_FOLDS = 5
# Rows below which isotonic regression is not even tried: with a handful of errors per
# class its steps are noise.
_MIN_ISOTONIC_ROWS = 100
ECE_BINS = 10
"""Equal-width confidence bins of the expected calibration error (NannyML uses 10)."""


def class_probabilities(outputs: np.ndarray, task: str) -> np.ndarray:
    """The ``[n, k]`` class-probability matrix of a classifier's outputs.

    Args:
        outputs: ``[n, k]`` softmax outputs, or ``[n, 1]`` / ``[n]`` sigmoid outputs of
            a binary classifier (the probability of class 1).
        task: ``multiclass`` or ``binary``.

    Returns:
        Float64 probabilities, clipped to ``[eps, 1 - eps]`` and rows summing to 1.
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out.reshape(-1, 1)
    if out.shape[1] == 1:
        p = np.clip(out[:, 0], _EPS, 1.0 - _EPS)
        return np.stack([1.0 - p, p], axis=1)
    out = np.clip(out, _EPS, None)
    return out / out.sum(axis=1, keepdims=True)


def predicted_classes(outputs: np.ndarray) -> np.ndarray:
    """The class a served output predicts: argmax, or ``p >= 0.5`` for one sigmoid column."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out.reshape(-1, 1)
    if out.shape[1] == 1:
        return (out[:, 0] >= 0.5).astype(np.int64)
    return out.argmax(axis=1).astype(np.int64)


def _scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(probs) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], _EPS, 1.0))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``y``.

    Args:
        probs: ``[n, k]`` class probabilities.
        y: ``[n]`` true class ids.

    Returns:
        ``T > 0``; 1 leaves the probabilities as they are.
    """
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(
        lambda log_t: _nll(_scale(probs, float(np.exp(log_t))), y), bounds=_LOG_T_BOUNDS, method="bounded"
    )
    return float(np.exp(result.x))


def _fit_isotonic_class(scores: np.ndarray, hits: np.ndarray) -> dict[str, list[float]]:
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, hits)
    x = np.asarray(model.X_thresholds_, dtype=np.float64)
    fitted = np.asarray(model.y_thresholds_, dtype=np.float64)
    if len(x) > _MAX_KNOTS:
        keep = np.unique(np.linspace(0, len(x) - 1, _MAX_KNOTS).round().astype(int))
        x, fitted = x[keep], fitted[keep]
    return {"x": [round(float(v), 8) for v in x], "y": [round(float(v), 8) for v in fitted]}


def _apply_isotonic(classes: list[dict[str, list[float]]], probs: np.ndarray) -> np.ndarray:
    out = np.empty_like(probs)
    for c, knots in enumerate(classes):
        out[:, c] = np.interp(probs[:, c], knots["x"], knots["y"])
    out = np.clip(out, _EPS, None)
    return np.asarray(out / out.sum(axis=1, keepdims=True))


def _fit_isotonic(probs: np.ndarray, y: np.ndarray) -> list[dict[str, list[float]]]:
    return [_fit_isotonic_class(probs[:, c], (y == c).astype(np.float64)) for c in range(probs.shape[1])]


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the predicted class: ``Σ_b (n_b / N) · |accuracy_b − confidence_b|``.

    Args:
        probs: ``[n, k]`` class probabilities; the predicted class is the argmax.
        y: ``[n]`` true class ids.
        bins: Equal-width confidence bins. Defaults to 10.

    Returns:
        The ECE in ``[0, 1]``; 0 for no rows.
    """
    if not len(y):
        return 0.0
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(len(y)), predicted]
    correct = (predicted == y).astype(np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


def calibrate(calibration: dict[str, Any], outputs: np.ndarray, task: str) -> np.ndarray:
    """Applies a stored calibrator to served outputs.

    Args:
        calibration: The ``"calibration"`` entry of ``baseline.json``.
        outputs: Model outputs, ``[n, k]`` (or ``[n, 1]`` for a sigmoid binary model).
        task: ``multiclass`` or ``binary``.

    Returns:
        ``[n, k]`` calibrated class probabilities.

    Raises:
        ValueError: An unknown method, or a calibrator for another number of classes.
    """
    probs = class_probabilities(outputs, task)
    method = calibration.get("method")
    if method == "temperature":
        temperature = float(calibration["temperature"])
        if not temperature > 0:
            raise ValueError(f"calibration temperature must be > 0, got {temperature}")
        return _scale(probs, temperature)
    if method == "isotonic":
        classes = calibration["classes"]
        if not isinstance(classes, list) or len(classes) != probs.shape[1]:
            raise ValueError(
                f"isotonic calibration has {len(classes)} classes; the outputs have {probs.shape[1]}"
            )
        return _apply_isotonic(classes, probs)
    raise ValueError(f"unknown calibration method {method!r}; expected 'temperature' or 'isotonic'")


def _cross_fitted_nll(probs: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    """Held-out NLL of each method: fit on four folds, score the fifth."""
    rng = np.random.default_rng(seed)
    folds = rng.permutation(len(y)) % _FOLDS
    scores = {"temperature": 0.0, "isotonic": 0.0}
    for k in range(_FOLDS):
        fit, held = folds != k, folds == k
        t = fit_temperature(probs[fit], y[fit])
        scores["temperature"] += _nll(_scale(probs[held], t), y[held]) * held.sum()
        scores["isotonic"] += _nll(
            _apply_isotonic(_fit_isotonic(probs[fit], y[fit]), probs[held]), y[held]
        ) * (held.sum())
    return {m: s / len(y) for m, s in scores.items()}


def fit_calibration(
    outputs: np.ndarray, y: np.ndarray, *, task: str, method: str = "auto", seed: int = 0
) -> dict[str, Any]:
    """Fits a calibrator on validation outputs and labels.

    Args:
        outputs: Model outputs on the validation rows.
        y: Their true class ids.
        task: ``multiclass`` or ``binary``.
        method: ``temperature``, ``isotonic`` or ``auto`` (the lower cross-fitted
            negative log-likelihood; temperature on small splits). Defaults to ``auto``.
        seed: Seed of the cross-fitting folds. Defaults to 0.

    Returns:
        The JSON-serialisable ``"calibration"`` entry of ``baseline.json``, with the
        validation ECE before and after and the validation accuracy next to its estimate.

    Raises:
        ValueError: No rows, a label outside the classes, or an unknown method.
    """
    probs = class_probabilities(outputs, task)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(y) != len(probs) or not len(y):
        raise ValueError(
            f"calibration needs one label per output row; got {len(y)} labels, {len(probs)} rows"
        )
    if y.min() < 0 or y.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class ids 0..{probs.shape[1] - 1}")
    if method not in ("auto", "temperature", "isotonic"):
        raise ValueError(f"unknown calibration method {method!r}")
    held_out: dict[str, float] = {}
    if method == "auto":
        # Isotonic needs both outcomes for every class in every fold.
        enough = len(y) >= _MIN_ISOTONIC_ROWS and np.bincount(y, minlength=probs.shape[1]).min() >= _FOLDS
        if enough:
            held_out = _cross_fitted_nll(probs, y, seed)
            method = min(held_out, key=lambda m: held_out[m])
        else:
            method = "temperature"
    entry: dict[str, Any] = {"method": method, "fitted_on": "validation", "rows": len(y)}
    if method == "temperature":
        entry["temperature"] = round(fit_temperature(probs, y), 6)
    else:
        entry["classes"] = _fit_isotonic(probs, y)
    calibrated = calibrate(entry, outputs, task)
    predicted = predicted_classes(outputs)
    entry["validation"] = {
        "accuracy": round(float(np.mean(predicted == y)), 6),
        "estimated_accuracy": round(float(calibrated[np.arange(len(y)), predicted].mean()), 6),
        "ece_before": round(expected_calibration_error(probs, y), 6),
        "ece_after": round(expected_calibration_error(calibrated, y), 6),
        "held_out_nll": {m: round(v, 6) for m, v in held_out.items()},
    }
    return entry
