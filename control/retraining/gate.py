"""The retrain's blessing gate: a candidate against the serving version, overall and per class.

A candidate is blessed when it reaches the floor, is not much worse than the serving version
on the trusted evaluation set overall or on any class (or target decile: :func:`slice_table`),
and keeps its lead under noise and over the run's strongest shallow baseline
(:func:`check_robustness`). :func:`format_gate_report` renders the gate's report for people.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.control.retraining.settings import RetrainSettings
from modelloop.training.evaluation import higher_is_better, main_metric, predict_labels, score
from modelloop.training.spec import TaskSpec, TaskType


@dataclass(frozen=True)
class Blessing:
    """The gate's verdict on one candidate.

    Attributes:
        blessed: Whether the candidate may be published.
        reason: One line a person reads.
        metric: ``accuracy`` or ``mae``.
        candidate: The candidate's metric on the fixed evaluation set.
        serving: The serving version's metric on the same rows.
        threshold: The absolute floor (accuracy) or ceiling (MAE) it had to clear.
        tolerance: How much worse than the serving version it was allowed to be.
    """

    blessed: bool
    reason: str
    metric: str
    candidate: float
    serving: float
    threshold: float
    tolerance: float


def bless(
    task: TaskType, candidate: float, serving: float, *, threshold: float, tolerance: float
) -> Blessing:
    """Applies the two TFX-style checks: an absolute bound, then "not worse than serving".

    Args:
        task: The task type; it decides whether higher or lower is better.
        candidate: The candidate's main metric on the fixed evaluation set.
        serving: The serving version's main metric on the same rows.
        threshold: Accuracy floor (classifiers) or MAE ceiling (regressors).
        tolerance: Allowed regression against the serving version, in metric units.

    Returns:
        The verdict with its reason.

    Example:
        >>> bless("multiclass", 0.95, 0.96, threshold=0.8, tolerance=0.02).blessed
        True
    """
    metric = main_metric(task)
    up = higher_is_better(task)
    verdict = {"metric": metric, "candidate": candidate, "serving": serving}
    verdict |= {"threshold": threshold, "tolerance": tolerance}
    if math.isnan(candidate):
        return Blessing(False, f"candidate {metric} is NaN", **verdict)
    if up and candidate < threshold:
        return Blessing(False, f"{metric} {candidate:.4f} is below the floor {threshold:.4f}", **verdict)
    if not up and candidate > threshold:
        return Blessing(False, f"{metric} {candidate:.4f} is above the ceiling {threshold:.4f}", **verdict)
    if up and candidate < serving - tolerance:
        reason = f"{metric} {candidate:.4f} is worse than serving {serving:.4f} by more than {tolerance:g}"
        return Blessing(False, reason, **verdict)
    if not up and candidate > serving + tolerance:
        reason = f"{metric} {candidate:.4f} is worse than serving {serving:.4f} by more than {tolerance:g}"
        return Blessing(False, reason, **verdict)
    return Blessing(True, f"{metric} {candidate:.4f} vs serving {serving:.4f}: blessed", **verdict)


def much_worse(task: TaskType, value: float, reference: float, settings: RetrainSettings) -> bool:
    """Whether ``value`` is much worse than ``reference`` (see :class:`RetrainSettings`).

    Example:
        >>> much_worse("multiclass", 0.90, 0.96, RetrainSettings())
        True
    """
    if math.isnan(value):
        return True
    if higher_is_better(task):
        return value < reference - settings.much_worse_accuracy
    return value > reference * (1.0 + settings.much_worse_mae_ratio)


def check_robustness(
    verdict: Blessing, task: TaskType, metrics: Mapping[str, Mapping[str, Any]], settings: RetrainSettings
) -> Blessing:
    """Withdraws a blessing when the candidate is much worse under noise or than a shallow model.

    Two checks, applied only to a candidate :func:`bless` passed:

    - ``eval_noisy``: the fixed evaluation rows with Gaussian noise (σ = 0.125 of each
      feature's range, clipped to it, seeded), scored for both models. A candidate no
      worse on clean rows but much worse than the serving version here is not blessed.
    - ``baseline``: the strongest shallow baseline of the candidate's run (trained on the
      same rows), scored on the clean evaluation rows. A candidate much worse than it keeps
      its blessing with a note in the reason, or, with ``baseline_check`` on, is rejected.

    Args:
        verdict: The verdict of :func:`bless`.
        task: The task type.
        metrics: The retrain's ``metrics``: ``candidate``, ``serving`` and ``baseline``,
            each per row set.
        settings: Where "much worse" is defined.

    Returns:
        ``verdict`` itself, or a copy that is not blessed with the reason.
    """
    if not verdict.blessed:
        return verdict
    metric = main_metric(task)
    noisy = metrics.get("candidate", {}).get("eval_noisy"), metrics.get("serving", {}).get("eval_noisy")
    if (
        noisy[0] is not None
        and noisy[1] is not None
        and much_worse(task, noisy[0][metric], noisy[1][metric], settings)
    ):
        reason = (
            f"under noise {metric} {noisy[0][metric]:.4f} is much worse than serving {noisy[1][metric]:.4f}"
            f" ({_much(task, settings)})"
        )
        return replace(verdict, blessed=False, reason=reason)
    shallow = metrics.get("baseline", {}).get("eval")
    if shallow is not None and much_worse(task, verdict.candidate, shallow[metric], settings):
        reason = (
            f"{metric} {verdict.candidate:.4f} is much worse than the shallow baseline's "
            f"{shallow[metric]:.4f} ({_much(task, settings)})"
        )
        if settings.baseline_check:
            return replace(verdict, blessed=False, reason=reason)
        return replace(verdict, reason=f"{verdict.reason}; note: {reason}")
    return verdict


def _much(task: TaskType, settings: RetrainSettings) -> str:
    if higher_is_better(task):
        return f"by more than {settings.much_worse_accuracy:g}"
    return f"by more than {settings.much_worse_mae_ratio:.0%}"


def predict_onnx(path: Path, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Runs an exported ``model.onnx`` on CPU over ``x``; the gate's one runtime for both models.

    Args:
        path: The ``model.onnx`` file.
        x: Raw features, float32 ``[n, features]``.
        batch_size: Rows per run. Defaults to 256.

    Returns:
        The first output, ``[n, ...]``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)


def score_sets(task: TaskType, onnx: Path, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The ONNX model's scores on each named set of rows (empty sets left out), with their row counts."""
    result: dict[str, Any] = {}
    for key, (x, y) in sets.items():
        if len(y) == 0:
            continue
        scores = score(task, y, predict_onnx(onnx, x))
        result[key] = {**scores, "rows": len(y)}
    return result


def common_sense_score(task: TaskType, y_train: np.ndarray, y_eval: np.ndarray) -> float:
    """The majority-class accuracy or mean-predictor MAE on the evaluation rows."""
    if task == "regression":
        return float(np.mean(np.abs(y_eval - float(np.mean(y_train)))))
    majority = int(np.bincount(y_train.astype(np.int64)).argmax())
    return float(np.mean(y_eval == majority))


def slice_table(
    task: TaskType,
    y: np.ndarray,
    serving: np.ndarray,
    candidate: np.ndarray,
    *,
    class_labels: list[str] | None = None,
    min_rows: int = 20,
    margin: float = 0.05,
) -> dict[str, Any]:
    """Scores both models per slice of the evaluation rows: per class, or per target decile.

    Classifiers are compared by recall (the share of a class's rows predicted as that
    class): a slice fails when the candidate's recall is lower than the serving version's
    by more than ``margin``, unless the candidate's F1 on that class is no lower (the
    serving version over-predicted the class, as a model does for every input it cannot
    read; a targeted flip lowers recall at equal precision, so its F1 falls). Regressors
    are compared by MAE per decile of the true target:
    a slice fails when the candidate's MAE exceeds the serving version's by more than
    ``margin`` of it. Slices with fewer than ``min_rows`` rows are listed but not gated.

    Args:
        task: The task type.
        y: True classes or values of the evaluation rows.
        serving: The serving version's outputs on those rows.
        candidate: The candidate's outputs on the same rows.
        class_labels: Names of the classes, for the table. Defaults to the class ids.
        min_rows: Rows a slice needs to be gated. Defaults to 20.
        margin: The allowed loss: recall points, or a share of the serving MAE.
            Defaults to 0.05.

    Returns:
        ``{"kind", "metric", "margin", "min_rows", "rows": [{"slice", "rows", "serving",
        "candidate", "delta", "gated", "passed"}, ...]}``.
    """
    rows: list[dict[str, Any]] = []
    if task == "regression":
        pred_s, pred_c = predict_labels(task, serving), predict_labels(task, candidate)
        edges = np.quantile(y, np.linspace(0.1, 0.9, 9)) if len(y) else np.zeros(0)
        bins = np.searchsorted(edges, y, side="right")
        for decile in range(10):
            mask = bins == decile
            n = int(mask.sum())
            if n == 0:
                continue
            mae_s = float(np.mean(np.abs(pred_s[mask] - y[mask])))
            mae_c = float(np.mean(np.abs(pred_c[mask] - y[mask])))
            low, high = float(y[mask].min()), float(y[mask].max())
            gated = n >= min_rows
            passed = not gated or mae_c <= mae_s * (1.0 + margin) + 1e-12
            name = f"decile {decile + 1} ({low:.4g}..{high:.4g})"
            rows.append(_slice_row(name, n, mae_s, mae_c, gated, passed))
        return {
            "kind": "target_decile",
            "metric": "mae",
            "margin": margin,
            "min_rows": min_rows,
            "rows": rows,
        }
    pred_s, pred_c = predict_labels(task, serving), predict_labels(task, candidate)
    labels = class_labels or []
    classes = sorted(set(np.asarray(y, dtype=np.int64).tolist()) | set(range(len(labels))))
    for cls in classes:
        mask = y == cls
        n = int(mask.sum())
        if n == 0:
            continue
        recall_s, recall_c = float(np.mean(pred_s[mask] == cls)), float(np.mean(pred_c[mask] == cls))
        f1_s, f1_c = _f1(pred_s, mask, cls, recall_s), _f1(pred_c, mask, cls, recall_c)
        gated = n >= min_rows
        fell = recall_c < recall_s - margin - 1e-12
        # A serving version that answers one class for everything (inputs it cannot read)
        # has a perfect recall there; a candidate that stops doing so loses recall but gains
        # more precision. That is no lost class, so a fall that leaves F1 no lower passes.
        excused = fell and f1_c >= f1_s
        passed = not gated or not fell or excused
        name = labels[cls] if cls < len(labels) else str(cls)
        row = _slice_row(name, n, recall_s, recall_c, gated, passed)
        row |= {"serving_f1": round(f1_s, 6), "candidate_f1": round(f1_c, 6), "excused": gated and excused}
        rows.append(row)
    return {"kind": "class", "metric": "recall", "margin": margin, "min_rows": min_rows, "rows": rows}


def _f1(predicted: np.ndarray, mask: np.ndarray, cls: int, recall: float) -> float:
    claimed = int(np.sum(predicted == cls))
    precision = float(np.sum(predicted[mask] == cls)) / claimed if claimed else 0.0
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _slice_row(
    name: str, n: int, serving: float, candidate: float, gated: bool, passed: bool
) -> dict[str, Any]:
    return {
        "slice": name,
        "rows": n,
        "serving": round(serving, 6),
        "candidate": round(candidate, 6),
        "delta": round(candidate - serving, 6),
        "gated": gated,
        "passed": passed,
    }


def slice_verdict(table: Mapping[str, Any]) -> str:
    """Why the slice table refuses a candidate, in one line; "" when every gated slice passed."""
    failed = [r for r in table["rows"] if not r["passed"]]
    if not failed:
        return ""
    worst = (
        min(failed, key=lambda r: r["delta"])
        if table["metric"] == "recall"
        else max(failed, key=lambda r: r["candidate"] - r["serving"] * (1 + table["margin"]))
    )
    others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    if table["metric"] == "recall":
        return (
            f"recall of class {worst['slice']!r} falls from {worst['serving']:.3f} to "
            f"{worst['candidate']:.3f}, more than the margin {table['margin']:g}{others}"
        )
    return (
        f"MAE of {worst['slice']} grows from {worst['serving']:.4g} to {worst['candidate']:.4g}, "
        f"more than {table['margin']:.0%}{others}"
    )


def format_gate_report(report: Mapping[str, Any]) -> str:
    """The gate's report as lines a person reads: the decision, the slice table, the sources.

    Args:
        report: A report as :func:`retrain` writes it (``gate.json``).

    Returns:
        Several lines, without a trailing newline.
    """
    overall = report["overall"]
    table = report["slices"]
    metric = overall["metric"]
    lines = [
        f"gate: {report['outcome']}: {report['reason']}",
        f"  {metric} on {overall['rows']} trusted rows: serving {overall['serving']:.4f}, "
        f"candidate {overall['candidate']:.4f} (bound {overall['threshold']:.4f}, "
        f"tolerance {overall['tolerance']:g})",
        f"  per {'class' if table['kind'] == 'class' else 'target decile'} ({table['metric']}, margin "
        f"{table['margin']:g}, gated from {table['min_rows']} rows):",
    ]
    width = max([len(str(r["slice"])) for r in table["rows"]] + [5])
    lines.append(f"    {'slice':<{width}} {'rows':>5} {'serving':>8} {'candidate':>9} {'delta':>8}")
    for r in table["rows"]:
        mark = "" if r["passed"] else "  FAIL"
        if r.get("excused"):
            mark = f"  (F1 {r['serving_f1']:.3f} -> {r['candidate_f1']:.3f}: precision bought it)"
        if not r["gated"]:
            mark = "  (too few rows to gate)"
        lines.append(
            f"    {r['slice']:<{width}} {r['rows']:>5} {r['serving']:>8.3f} {r['candidate']:>9.3f} "
            f"{r['delta']:>+8.3f}{mark}"
        )
    sources = report.get("sources") or []
    if sources:
        lines.append("  label sources:")
    for src in sources:
        if src.get("quarantined"):
            why = "; ".join(src.get("reasons") or []) or "quarantined"
            lines.append(f"    {src['source']}: quarantined, {src['rows']} rows left out ({why})")
        else:
            capped = (
                f" (capped from {src['train_rows']})" if src["train_rows_used"] < src["train_rows"] else ""
            )
            lines.append(
                f"    {src['source']}: {src['train_rows_used']} training rows{capped}, "
                f"{src['holdout_rows']} evaluation rows"
            )
    return "\n".join(lines)


def noisy_rows(spec: TaskSpec, x_train: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """The evaluation rows under the robustness figures' higher noise level, seeded.

    The ranges come from the spec's own training rows (or its pixel range), not from
    feedback, so every retrain of a model perturbs the same rows the same way.
    """
    from modelloop.training.preprocessing import fit_scaling
    from modelloop.training.robustness import GATE_NOISE_LEVEL, gaussian_noise

    scaling = fit_scaling(x_train, spec.pixel_range)
    return gaussian_noise(x, scaling.low, scaling.high, GATE_NOISE_LEVEL, np.random.default_rng(seed))
