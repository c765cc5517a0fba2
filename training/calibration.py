"""Calibrated class probabilities for label-free accuracy estimation (CBPE).

Monitoring averages, over a window of served outputs, the probability that each
predicted class is right: that mean is the expected accuracy of the window
(confidence-based performance estimation, as NannyML's CBPE does). It is only as good as
those probabilities. Training stores a calibrator in ``baseline.json`` under
``"calibration"``, fitted on rows that neither the weights nor early stopping saw (the
test split, or out-of-fold predictions with ``--folds``); monitoring applies it.

Three methods, one JSON shape each:

- **None** (``{"method": "none"}``): the raw probabilities. A softmax trained with a
  cross-entropy loss is often well calibrated already, and a calibrator fitted on a few
  hundred rows with a handful of errors then only adds noise.
- **Temperature scaling** (``{"method": "temperature", "temperature": T}``): the class
  probabilities become ``softmax(log p / T)``. One parameter; it keeps the predicted class.
- **Isotonic per class** (``{"method": "isotonic", "classes": [{"x": [...], "y": [...]}, ...]}``):
  one-vs-rest isotonic regression of "the row is class c" on ``p_c``, applied by linear
  interpolation between the fitted knots, then renormalised so each row sums to 1. A
  class that calibrating does not help has the identity knots ``x = y = [0, 1]``.

:func:`select_calibration` chooses by the calibration error on held-out folds (5 folds,
repeated twice): raw probabilities unless a calibrator lowers it, isotonic class by class.
:func:`fit_calibration` fits the chosen one on every row and records the choice, the row
count and the held-out error before and after. Applying a calibrator needs numpy only.

Example:

```python
calibration = fit_calibration(test_outputs, y_test, task="multiclass", fitted_on="test split")
probs = calibrate(calibration, served_outputs, task="multiclass")
predicted = served_outputs.argmax(axis=1)
expected_accuracy = probs[np.arange(len(probs)), predicted].mean()
```
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

# Probabilities are clipped away from 0 and 1 before a log: a softmax may round to 0.
_EPS = 1e-7
# Temperature search range (log-space): wide enough for any sane network.
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
# Isotonic knots kept per class; the fitted step function has at most one per distinct score.
_MAX_KNOTS = 200
_FOLDS = 5
_REPEATS = 2
# A calibrator is kept only where it lowers the held-out error in this share of bootstrap
# resamples of the rows: on a few hundred confident rows the error's noise is as large as
# any gain, and a calibrator chosen on noise moves the estimate for nothing.
_BOOTSTRAPS = 200
_CONFIDENCE = 0.95
# Rows below which isotonic regression is not even tried: with a handful of errors per
# class its steps are noise.
_MIN_ISOTONIC_ROWS = 100
ECE_BINS = 10
"""Equal-width confidence bins of the expected calibration error (NannyML uses 10)."""
METHODS = ("none", "temperature", "isotonic")
"""The calibrators ``baseline.json`` may hold; ``none`` keeps the raw probabilities."""


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
    if method == "none":
        return probs
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
    raise ValueError(f"unknown calibration method {method!r}; expected 'none', 'temperature' or 'isotonic'")


def _ovr_calibration_error(scores: np.ndarray, hits: np.ndarray, bins: int = ECE_BINS) -> float:
    """Calibration error of one score against 0/1 outcomes over equal-count bins (NannyML's).

    The rows are sorted by score and cut into ``bins`` bins of equal size; the error is
    ``Σ_b (n_b / N) · |mean hit_b − mean score_b|``. Equal counts, not equal widths:
    with equal widths a confident model's few unsure rows sit in sparse bins whose noise
    dominates, and a calibrator that merely sharpens (moving rows into the top bin)
    looks better on held-out rows than it is.
    """
    n = len(scores)
    if not n:
        return 0.0
    order = np.argsort(scores, kind="stable")
    edges = np.linspace(0, n, min(bins, n) + 1).round().astype(int)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            rows = order[lo:hi]
            total += (hi - lo) / n * abs(hits[rows].mean() - scores[rows].mean())
    return float(total)


def equal_count_calibration_error(probs: np.ndarray, y: np.ndarray) -> float:
    """Calibration error of the predicted class's probability, over equal-count bins.

    Args:
        probs: ``[n, k]`` class probabilities; the predicted class is the argmax.
        y: ``[n]`` true class ids.

    Returns:
        The error in ``[0, 1]``; 0 for no rows.
    """
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(len(y)), predicted]
    return _ovr_calibration_error(confidence, (predicted == y).astype(np.float64))


def _renormalise(probs: np.ndarray) -> np.ndarray:
    out = np.clip(probs, _EPS, None)
    return np.asarray(out / out.sum(axis=1, keepdims=True))


def _estimate_bias(probs: np.ndarray, outputs_predicted: np.ndarray, y: np.ndarray) -> float:
    """Mean calibrated probability of the predicted class minus the accuracy (signed)."""
    rows = np.arange(len(y))
    return float(probs[rows, outputs_predicted].mean() - np.mean(outputs_predicted == y))


def _cross_fit(probs: np.ndarray, y: np.ndarray, seed: int, isotonic: bool) -> dict[str, list[np.ndarray]]:
    """Held-out probabilities of each candidate: fit on four folds, apply to the fifth.

    Returns one ``[n, k]`` matrix per repeat and candidate; ``isotonic_raw`` holds the
    per-class isotonic scores before renormalisation, so classes can be chosen one by one.
    """
    found: dict[str, list[np.ndarray]] = {"temperature": [], "isotonic_raw": []}
    n, k = probs.shape
    for repeat in range(_REPEATS):
        folds = np.random.default_rng([seed, repeat]).permutation(n) % _FOLDS
        scaled = np.empty_like(probs)
        iso = probs.copy()
        for f in range(_FOLDS):
            fit, held = folds != f, folds == f
            scaled[held] = _scale(probs[held], fit_temperature(probs[fit], y[fit]))
            if not isotonic:
                continue
            for c in range(k):
                hits = (y[fit] == c).astype(np.float64)
                # Isotonic regression needs both outcomes; otherwise the class stays raw.
                if 0 < hits.sum() < len(hits):
                    knots = _fit_isotonic_class(probs[fit, c], hits)
                    iso[held, c] = np.interp(probs[held, c], knots["x"], knots["y"])
        found["temperature"].append(scaled)
        found["isotonic_raw"].append(iso)
    return found


def _lowers_surely(
    before: Callable[[np.ndarray], float], after: Callable[[np.ndarray], float], n: int, seed: int
) -> bool:
    """Whether ``after`` is below ``before`` on the rows and in 95 % of bootstrap resamples."""
    every = np.arange(n)
    if not after(every) < before(every):
        return False
    rng = np.random.default_rng([seed, n])
    wins = 0
    for _ in range(_BOOTSTRAPS):
        rows = rng.integers(0, n, n)
        wins += after(rows) < before(rows)
    return wins >= _CONFIDENCE * _BOOTSTRAPS


_Error = Callable[[np.ndarray], float]


def _class_errors(
    scores: np.ndarray, is_class: np.ndarray, isotonic: list[np.ndarray], c: int
) -> tuple[_Error, _Error]:
    """One class's error on given rows: raw, and isotonic (mean over the repeats)."""
    hits = is_class.astype(np.float64)

    def raw(rows: np.ndarray) -> float:
        return _ovr_calibration_error(scores[rows], hits[rows])

    def calibrated(rows: np.ndarray) -> float:
        return float(np.mean([_ovr_calibration_error(iso[rows, c], hits[rows]) for iso in isotonic]))

    return raw, calibrated


def _method_errors(probs: np.ndarray, y: np.ndarray, candidate: list[np.ndarray]) -> tuple[_Error, _Error]:
    """The predicted class's error on given rows: raw, and a candidate's (mean over the repeats)."""

    def raw(rows: np.ndarray) -> float:
        return equal_count_calibration_error(probs[rows], y[rows])

    def calibrated(rows: np.ndarray) -> float:
        return float(np.mean([equal_count_calibration_error(p[rows], y[rows]) for p in candidate]))

    return raw, calibrated


def select_calibration(
    outputs: np.ndarray, y: np.ndarray, *, task: str, seed: int = 0
) -> tuple[str, list[int], dict[str, Any]]:
    """Chooses the calibrator by its calibration error on held-out folds.

    Every candidate is fitted on four folds and scored on the fifth (5 folds, repeated
    twice with other shuffles), so the error is measured on rows its fit never saw, over
    equal-count bins as NannyML measures it. Raw probabilities are kept unless a
    calibrator lowers that error, on the rows and in 95 % of bootstrap resamples of them:

    - **isotonic** is chosen class by class, as NannyML's CBPE does: a class is
      calibrated only where its one-vs-rest error is lower calibrated than raw; the
      other classes keep their raw probability;
    - **temperature** (one parameter for every class) is the other candidate;
    - of the candidates that lower the error of the predicted class's probability, the
      lowest is kept; ``none`` (raw probabilities) when none does.

    Splits under 100 rows try temperature only, and under 10 rows nothing.

    Args:
        outputs: Model outputs on the calibration rows.
        y: Their true class ids.
        task: ``multiclass`` or ``binary``.
        seed: Seed of the folds. Defaults to 0.

    Returns:
        The method, the classes isotonic regression calibrates (empty otherwise), and
        the held-out figures: ECE of each candidate, and the signed bias of the estimate
        (mean probability of the predicted class minus accuracy) before and after.
    """
    probs = class_probabilities(outputs, task)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    predicted = predicted_classes(outputs)
    n, k = probs.shape
    held_out: dict[str, Any] = {"folds": _FOLDS, "repeats": _REPEATS}
    if n < 2 * _FOLDS:
        raw_ece = equal_count_calibration_error(probs, y)
        raw_bias = _estimate_bias(probs, predicted, y)
        held_out |= {"ece": {"none": raw_ece}, "bias": {"none": raw_bias}}
        return "none", [], held_out
    isotonic = n >= _MIN_ISOTONIC_ROWS
    fitted = _cross_fit(probs, y, seed, isotonic)
    candidates: dict[str, list[np.ndarray]] = {
        "none": [probs] * _REPEATS,
        "temperature": fitted["temperature"],
    }
    classes: list[int] = []
    if isotonic:
        for c in range(k):
            if _lowers_surely(*_class_errors(probs[:, c], y == c, fitted["isotonic_raw"], c), n, seed + c):
                classes.append(c)
        if classes:
            chosen = []
            for iso in fitted["isotonic_raw"]:
                mixed = probs.copy()
                mixed[:, classes] = iso[:, classes]
                chosen.append(_renormalise(mixed))
            candidates["isotonic"] = chosen
    ece = {
        m: float(np.mean([equal_count_calibration_error(p, y) for p in ps])) for m, ps in candidates.items()
    }
    bias = {m: float(np.mean([_estimate_bias(p, predicted, y) for p in ps])) for m, ps in candidates.items()}
    method = "none"
    for m in ("temperature", "isotonic"):
        if m not in ece or ece[m] >= ece[method]:
            continue
        if _lowers_surely(*_method_errors(probs, y, candidates[m]), n, seed):
            method = m
    held_out |= {"ece": ece, "bias": bias}
    return method, classes if method == "isotonic" else [], held_out


def fit_calibration(
    outputs: np.ndarray,
    y: np.ndarray,
    *,
    task: str,
    method: str = "auto",
    seed: int = 0,
    fitted_on: str = "validation",
) -> dict[str, Any]:
    """Fits a calibrator on held-out outputs and labels.

    The rows should be ones that neither the weights nor early stopping saw (the
    training job passes its test split, or out-of-fold predictions with ``--folds``):
    on the split early stopping chose the weights on, the model looks better than it
    is and a calibrator learns to push probabilities up.

    Args:
        outputs: Model outputs on the calibration rows.
        y: Their true class ids.
        task: ``multiclass`` or ``binary``.
        method: ``auto`` (:func:`select_calibration`: raw probabilities unless a
            calibrator lowers the held-out calibration error), ``none``, ``temperature``
            or ``isotonic`` (every class). Defaults to ``auto``.
        seed: Seed of the cross-fitting folds. Defaults to 0.
        fitted_on: What the rows are, recorded in the entry. Defaults to ``validation``.

    Returns:
        The JSON-serialisable ``"calibration"`` entry of ``baseline.json``: the method
        and its parameters, ``fitted_on`` and ``rows``, ``held_out`` (the ECE before and
        after calibrating on held-out folds, each candidate's ECE, the estimate's bias)
        and ``fit`` (accuracy and estimated accuracy on the rows themselves).

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
    if method not in ("auto", *METHODS):
        raise ValueError(f"unknown calibration method {method!r}")
    chosen, classes, held_out = select_calibration(outputs, y, task=task, seed=seed)
    if method == "auto":
        method = chosen
    elif method == "isotonic":
        classes = list(range(probs.shape[1]))
    entry: dict[str, Any] = {"method": method, "fitted_on": fitted_on, "rows": len(y)}
    if method == "temperature":
        entry["temperature"] = round(fit_temperature(probs, y), 6)
    elif method == "isotonic":
        identity = {"x": [0.0, 1.0], "y": [0.0, 1.0]}
        entry["classes"] = [
            _fit_isotonic_class(probs[:, c], (y == c).astype(np.float64)) if c in classes else identity
            for c in range(probs.shape[1])
        ]
        entry["calibrated_classes"] = classes
    ece, bias = held_out["ece"], held_out["bias"]
    entry["held_out"] = {
        "folds": held_out["folds"],
        "repeats": held_out["repeats"],
        "ece_before": round(ece["none"], 6),
        "ece_after": round(ece.get(method, ece["none"]), 6),
        "bias_before": round(bias["none"], 6),
        "bias_after": round(bias.get(method, bias["none"]), 6),
        "ece": {m: round(v, 6) for m, v in ece.items()},
    }
    calibrated = calibrate(entry, outputs, task)
    predicted = predicted_classes(outputs)
    entry["fit"] = {
        "accuracy": round(float(np.mean(predicted == y)), 6),
        "estimated_accuracy": round(float(calibrated[np.arange(len(y)), predicted].mean()), 6),
    }
    return entry
