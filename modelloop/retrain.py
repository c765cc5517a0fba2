"""Feedback-augmented retraining with a TFX-style blessing gate that looks at every class.

``retrain(repo, name, feedback, reports=..., screen=...)`` closes the loop for one model:

1. Read the serving (latest) version's ``model.json``: which spec trained it, with which seed.
2. Load the spec's data and the labelled feedback rows, each with its labeler source, from
   the prediction store. The label checks (``screen``, the monitoring package's
   quarantine, passed in by the caller) name the quarantined sources: their rows are left
   out of training and of the evaluation. Of the trusted rows, the most recent
   ``holdout_fraction`` is held out for the evaluation; the rest is appended to the
   training part, with no source contributing more than ``max_source_share`` of the
   training rows (a source over the cap keeps its most recent rows).
3. Train, export to a staging directory and check parity. Nothing is published yet.
4. Gate on the trusted set: the original test split (regenerated from the spec with the
   recorded seed) plus the held-out trusted feedback. Both the serving version and the
   candidate are scored with ONNX Runtime on exactly the same rows, overall and per slice
   (per class for classifiers, per target decile for regressors). The candidate is
   blessed when it clears an absolute floor (accuracy floor or MAE ceiling), is not worse
   than the serving version by more than ``tolerance`` overall, and no slice with at
   least ``min_slice_rows`` rows got worse by more than its margin: a class's recall may
   fall by at most ``class_margin`` (0.05), a decile's MAE may grow by at most
   ``decile_margin`` of the serving version's. Then the robustness checks
   (:func:`check_robustness`): on the same rows under Gaussian noise it is not much worse
   than the serving version, and on the clean rows it is not much worse than the
   strongest shallow baseline trained on the same rows. "Much worse" is more than
   ``much_worse_accuracy`` (0.05) below in accuracy, or more than ``much_worse_mae_ratio``
   (10 %) above in MAE.
5. Publish a blessed candidate as version v+1; servers pick it up on their next poll.

Every run ends with one outcome, ``blessed``, ``rejected`` or ``failed``, logged with
its metrics, written as a JSON record under ``<state_dir>/retrain/<name>/`` and counted in
``modelloop_retrain_runs_total{model,outcome}`` when a counter is passed in. A run that
reached the gate also leaves the gate's report (the slice table, the label sources and
rows used, the decision and its reason) as ``gate.json`` in its run directory and as a
row in the store; :func:`format_gate_report` renders it for people.

Example:

```python
stores = open_stores("sqlite:///.modelloop/modelloop.db")
result = retrain(Path("models"), "digits", stores.feedback, reports=stores.retrains)
print(result.outcome, result.version)
```
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelloop import layout
from modelloop.errors import ModelloopError, ServiceError
from modelloop.training.evaluation import higher_is_better, main_metric, predict_labels, score
from modelloop.training.spec import Dataset, TaskSpec, TaskType

if TYPE_CHECKING:
    from prometheus_client import Counter

logger = logging.getLogger(__name__)

Outcome = Literal["blessed", "rejected", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("blessed", "rejected", "failed")
RETRAIN_DIR = "retrain"


class RetrainError(ModelloopError):
    """The retrain cannot start: unknown model, no version, unreadable metadata or settings."""


class FeedbackSource(Protocol):
    """Where labelled feedback rows come from (the monitoring ``FeedbackStore``)."""

    def feedback_rows(self, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Inputs ``[n, features]``, targets ``[n]``, sources ``[n]`` and row keys ``[n]`` of
        labelled rows, oldest first; a row labelled by several sources appears once per source,
        under the same key."""
        ...


class ReportSink(Protocol):
    """Where gate reports go (the monitoring ``RetrainReportStore``)."""

    def record_retrain(self, model: str, run_id: str, outcome: str, report: dict[str, Any]) -> None:
        """Keeps one gate report."""
        ...


class SourceVerdict(Protocol):
    """What the retrain needs of one source's label-check verdict."""

    quarantined: bool

    def as_dict(self) -> dict[str, Any]:
        """The verdict as JSON data, copied into the gate report."""
        ...


class SourceScreen(Protocol):
    """The label checks that name quarantined sources (``monitoring.quarantine.SourceQuarantine``)."""

    def assess(self, model: str, version_dir: Path) -> Mapping[str, SourceVerdict]:
        """Judges every source of ``model`` against the serving version in ``version_dir``."""
        ...


class RetrainSettings(BaseModel):
    """Gate and training knobs; per model from ``<repo>/<name>/config.json`` key ``"retrain"``.

    Example:

    ```json
    {"retrain": {"epochs": 5, "accuracy_floor": 0.85, "tolerance": 0.01}}
    ```
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1)
    """Most epochs of the retrain; None = the spec's own."""
    accuracy_floor: float | None = Field(default=None, ge=0, le=1)
    """Classifiers: lowest accuracy on the fixed evaluation set; None = beat the majority class."""
    mae_ceiling: float | None = Field(default=None, gt=0)
    """Regressors: highest MAE on the fixed evaluation set; None = beat the mean predictor."""
    tolerance: float = Field(default=0.01, ge=0)
    """How much worse than the serving version (in metric units) a candidate may be."""
    holdout_fraction: float = Field(default=0.3, ge=0, lt=1)
    """Share of the most recent trusted labelled rows kept out of training, for the evaluation set."""
    max_feedback_rows: int = Field(default=100_000, ge=0)
    """Most recent labelled rows used at all; older ones are ignored."""
    max_source_share: float = Field(default=0.5, gt=0, le=1)
    """Most of the training rows (spec rows included) one labeler source may contribute; 1 = no cap.

    0.5: a single source, one leaked token or one buggy pipeline, never outweighs the
    curated data and every other source together, yet one labelling team stays useful."""
    class_margin: float = Field(default=0.05, ge=0, le=1)
    """Classifiers: most a class's recall on the trusted set may fall against the serving version."""
    decile_margin: float = Field(default=0.25, ge=0)
    """Regressors: most a target decile's MAE may grow, as a share of the serving version's."""
    min_slice_rows: int = Field(default=20, ge=1)
    """Slices (classes, deciles) with fewer evaluation rows are reported but not gated.

    20: below it one row moves a recall by more than the 0.05 margin."""
    much_worse_accuracy: float = Field(default=0.05, ge=0, le=1)
    """Classifiers: accuracy points by which a candidate is "much worse" (robustness checks)."""
    much_worse_mae_ratio: float = Field(default=0.10, ge=0)
    """Regressors: share of the reference MAE by which a candidate is "much worse"."""
    baseline_check: bool = False
    """Reject a candidate much worse than the strongest shallow baseline on the same rows.

    Off by default: the comparison is always made and a candidate much worse than the
    shallow model is named so in the verdict, but rejecting it would keep a serving version
    that is usually worse still (after drift, a few epochs of the network catch up more
    slowly than an SVC refitted on the same rows)."""

    @classmethod
    def for_model(cls, model_dir: Path, **overrides: Any) -> RetrainSettings:
        """Reads ``config.json``'s ``"retrain"`` block and applies ``overrides`` on top.

        Raises:
            RetrainError: ``config.json`` is unreadable or its ``"retrain"`` block is invalid.
        """
        values: dict[str, Any] = {}
        config = model_dir / layout.CONFIG_FILE
        if config.exists():
            try:
                raw = json.loads(config.read_text())
            except (OSError, ValueError) as exc:
                raise RetrainError(f"{str(config)!r} is unreadable: {exc}") from exc
            block = raw.get("retrain", {}) if isinstance(raw, dict) else {}
            if not isinstance(block, dict):
                raise RetrainError(f'{str(config)!r}: "retrain" must be an object')
            values.update(block)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RetrainError(f"invalid retrain setting {where}: {first['msg']}") from None


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


@dataclass
class RetrainResult:
    """What one retrain run did.

    Attributes:
        model: The model name.
        outcome: ``blessed``, ``rejected`` or ``failed``.
        reason: One line: the gate's verdict or the error.
        serving_version: The version the candidate was compared with.
        version: The published version (blessed runs only).
        metrics: Per model (``serving``, ``candidate``) and per row set (``eval``,
            ``test_split``, ``feedback_holdout``), the task's metrics.
        feedback_rows: Labelled rows used: ``train`` and ``holdout`` (trusted sources,
            after the cap), and ``quarantined``: rows of quarantined sources left out.
        gate: The gate's report (see :func:`format_gate_report`), or None when the run
            ended before the gate.
        seconds: Wall time of the run.
        record: The JSON run record written under the state directory.
        run_dir: The training run directory.
        gate_report: The gate's report file in the run directory, when there is one.
        baseline: The strongest shallow baseline the candidate was compared with; its
            scores are ``metrics["baseline"]``.
    """

    model: str
    outcome: Outcome
    reason: str
    serving_version: int | None = None
    version: int | None = None
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    feedback_rows: dict[str, int] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    seconds: float = 0.0
    record: Path | None = None
    run_dir: Path | None = None
    gate_report: Path | None = None
    baseline: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-serialisable data."""
        data = asdict(self)
        for key in ("record", "run_dir", "gate_report"):
            value = getattr(self, key)
            data[key] = str(value) if value else None
        return data


@dataclass(frozen=True)
class _Serving:
    version: int
    path: Path
    spec_source: str
    seed: int


def _serving_version(repo: Path, name: str) -> _Serving:
    from modelloop.export.publish import PublishError, list_versions, validate_model_name

    try:
        validate_model_name(name)
    except PublishError as exc:
        raise RetrainError(str(exc)) from None
    versions = list_versions(repo / name)
    if not versions:
        raise RetrainError(f"model {name!r} has no version in {str(repo)!r}: nothing to retrain")
    path = repo / name / str(versions[-1])
    try:
        card = layout.read_model_card(path)
        run = card.extra["training_run"]
        source, seed = str(run["spec"]["source"]), int(run.get("seed") or 42)
    except (layout.LayoutError, KeyError, TypeError, ValueError) as exc:
        where = str(path / layout.MODEL_CARD_FILE)
        raise RetrainError(f"{where!r} does not say which spec trained it: {exc}") from exc
    return _Serving(versions[-1], path, source, seed)


@dataclass
class _Feedback:
    """The feedback a run uses: trusted rows split into training and holdout, and the accounting."""

    train: Dataset
    holdout: Dataset
    sources: dict[str, dict[str, Any]]
    quarantined_rows: int = 0


def source_caps(base_rows: int, counts: Mapping[str, int], share: float) -> dict[str, int]:
    """The most training rows each source may contribute so that none exceeds ``share`` of the total.

    The total counts the spec's own training rows and every source's rows after its cap;
    the caps are tightened together until they hold for every source at once.

    Args:
        base_rows: Training rows that belong to no source (the spec's training split).
        counts: Source -> its trusted training rows.
        share: The most share of the training rows one source may have (1 = no cap).

    Returns:
        Source -> rows allowed (at most its count).

    Example:
        >>> source_caps(100, {"a": 500, "b": 20}, 0.5)
        {'a': 120, 'b': 20}
    """
    allowed = dict(counts)
    if share >= 1:
        return allowed
    ratio = share / (1.0 - share)
    for _ in range(100 * (len(counts) + 1)):
        changed = False
        for source in sorted(allowed):
            others = base_rows + sum(v for k, v in allowed.items() if k != source)
            # Rounded down, with a tolerance, so a source at exactly the cap keeps its rows.
            limit = min(counts[source], math.floor(ratio * others + 1e-9))
            if limit < allowed[source]:
                allowed[source], changed = limit, True
        if not changed:
            break
    return allowed


def _feedback(
    store: FeedbackSource | None,
    name: str,
    spec: TaskSpec,
    data: Dataset,
    settings: RetrainSettings,
    quarantined: set[str],
    base_rows: int,
) -> _Feedback:
    """Trusted labelled rows split into (train, holdout); the holdout is the most recent slice."""
    width = data.x.shape[1]

    def part(x: np.ndarray, y: np.ndarray) -> Dataset:
        return Dataset(x=x, y=y, feature_names=data.feature_names, class_labels=data.class_labels)

    empty = part(np.zeros((0, width), np.float32), np.zeros((0,), data.y.dtype))
    if store is None or settings.max_feedback_rows == 0:
        return _Feedback(empty, empty, {})
    x, y, sources, keys = store.feedback_rows(name)
    x, y, sources = np.asarray(x, dtype=np.float32), np.asarray(y), np.asarray(sources, dtype=object)
    keys = np.asarray(keys, dtype=object)
    if x.ndim != 2 or len(x) == 0:
        return _Feedback(empty, empty, {})
    if x.shape[1] != width:
        # The store keeps a bounded sample of columns; rows without every feature cannot train.
        logger.warning(
            "retrain %s: feedback rows have %d features, the spec %d; feedback not used",
            name,
            x.shape[1],
            width,
        )
        return _Feedback(empty, empty, {})
    y = y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
    keep = np.isfinite(y) & np.all(np.isfinite(x), axis=1)
    if spec.task != "regression":
        n_classes = max(len(data.class_labels), int(data.y.max()) + 1)
        keep &= (y == np.round(y)) & (y >= 0) & (y < n_classes)
    accounting: dict[str, dict[str, Any]] = {}
    for source in sorted(set(sources.tolist())):
        mine = sources == source
        accounting[source] = {
            "source": source,
            "rows": int(mine.sum()),
            "unusable_rows": int((mine & ~keep).sum()),
            "quarantined": source in quarantined,
            "train_rows": 0,
            "train_rows_used": 0,
            "holdout_rows": 0,
        }
    blocked = np.isin(sources, sorted(quarantined)) if quarantined else np.zeros(len(y), bool)
    quarantined_rows = int((keep & blocked).sum())
    keep &= ~blocked
    # One label per row: the oldest trusted one, when several sources labelled it.
    seen: set[object] = set()
    for i in np.flatnonzero(keep):
        if keys[i] in seen:
            keep[i] = False
        seen.add(keys[i])
    x, y, sources = (a[keep][-settings.max_feedback_rows :] for a in (x, y, sources))
    y = y.astype(data.y.dtype)
    n_hold = math.ceil(len(y) * settings.holdout_fraction) if len(y) >= 2 else 0
    cut = len(y) - n_hold
    train_sources = sources[:cut]
    counts = {s: int((train_sources == s).sum()) for s in sorted(set(train_sources.tolist()))}
    caps = source_caps(base_rows, counts, settings.max_source_share)
    use = np.zeros(cut, bool)
    for source, allowed in caps.items():
        rows = np.flatnonzero(train_sources == source)
        # A source over its cap keeps its most recent rows, like max_feedback_rows does.
        use[rows[len(rows) - allowed :] if allowed else []] = True
        accounting[source]["train_rows"] = counts[source]
        accounting[source]["train_rows_used"] = allowed
    for source in set(sources[cut:].tolist()):
        accounting[source]["holdout_rows"] = int((sources[cut:] == source).sum())
    return _Feedback(part(x[:cut][use], y[:cut][use]), part(x[cut:], y[cut:]), accounting, quarantined_rows)


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


def _score_sets(task: TaskType, onnx: Path, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, (x, y) in sets.items():
        if len(y) == 0:
            continue
        scores = score(task, y, predict_onnx(onnx, x))
        result[key] = {**scores, "rows": len(y)}
    return result


def _common_sense(task: TaskType, y_train: np.ndarray, y_eval: np.ndarray) -> float:
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


def _noisy(spec: TaskSpec, x_train: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """The evaluation rows under the robustness figures' higher noise level, seeded.

    The ranges come from the spec's own training rows (or its pixel range), not from
    feedback, so every retrain of a model perturbs the same rows the same way.
    """
    from modelloop.training.preprocessing import fit_scaling
    from modelloop.training.robustness import GATE_NOISE_LEVEL, gaussian_noise

    scaling = fit_scaling(x_train, spec.pixel_range)
    return gaussian_noise(x, scaling.low, scaling.high, GATE_NOISE_LEVEL, np.random.default_rng(seed))


@contextlib.contextmanager
def _model_lock(state_dir: Path, name: str) -> Iterator[None]:
    """One retrain per model at a time per state directory; a second fails at once."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f".{name}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainError(f"another retrain of {name!r} is running") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def retrain(
    repo: Path,
    name: str,
    feedback: FeedbackSource | None = None,
    *,
    reports: ReportSink | None = None,
    state_dir: Path = Path(".modelloop"),
    settings: RetrainSettings | None = None,
    runs_total: Counter | None = None,
    screen: SourceScreen | None = None,
) -> RetrainResult:
    """Retrains one model on its spec's data plus trusted feedback, gates it, and publishes it if blessed.

    Args:
        repo: The model repository root.
        name: The model to retrain; its latest version is "serving".
        feedback: Labelled feedback (``feedback_rows(name)``). Defaults to None (spec data only).
        reports: Where the gate report goes besides the run directory. Defaults to None.
        state_dir: Where run directories and JSON run records go. Defaults to ``.modelloop``.
        settings: Gate and training knobs. Defaults to ``config.json``'s ``"retrain"`` block.
        runs_total: ``modelloop_retrain_runs_total`` (labels ``model``, ``outcome``) to count
            the outcome in. Defaults to None.
        screen: The label checks that name quarantined sources. Defaults to None (every
            source is trusted).

    Returns:
        The outcome. Failures after the start (training crash, failed parity, unreadable
        store) are returned as ``failed``, counted and recorded; nothing is published.

    Raises:
        RetrainError: The run could not start: unknown model, no version, bad settings or
            another retrain of the same model is running. Nothing is counted.
    """
    started = time.monotonic()
    serving = _serving_version(repo, name)
    settings = settings if settings is not None else RetrainSettings.for_model(repo / name)
    run_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
    out_dir = state_dir / RETRAIN_DIR / name
    result = RetrainResult(model=name, outcome="failed", reason="", serving_version=serving.version)
    with _model_lock(out_dir, name):
        try:
            _run(repo, name, feedback, screen, serving, settings, out_dir / run_id, result)
        except Exception as exc:
            # Any crash (training, export, parity, store) is a failed run: recorded and counted.
            logger.exception("retrain %s failed", name)
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            result.outcome, result.version = "failed", None
            result.reason = f"{type(exc).__name__}: {first_line}".rstrip(": ")
        if result.gate is not None:
            _keep_gate_report(reports, name, run_id, result, result.gate)
        result.seconds = round(time.monotonic() - started, 2)
        result.record = out_dir / f"{run_id}.json"
        record = {"run_id": run_id, "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        record |= result.to_dict()
        result.record.write_text(json.dumps(record, indent=2) + "\n")
    if runs_total is not None:
        runs_total.labels(model=name, outcome=result.outcome).inc()
    logger.info(
        "retrain %s: %s (%s) serving v%s -> %s; metrics %s; feedback %s; %.1f s",
        name,
        result.outcome,
        result.reason,
        serving.version,
        f"v{result.version}" if result.version else "nothing published",
        json.dumps(result.metrics),
        result.feedback_rows,
        result.seconds,
    )
    return result


def _keep_gate_report(
    reports: ReportSink | None, name: str, run_id: str, result: RetrainResult, gate: dict[str, Any]
) -> None:
    """Writes the gate's report into the run directory and the store, with the run's final outcome."""
    gate.update(
        {"run_id": run_id, "outcome": result.outcome, "reason": result.reason, "version": result.version}
    )
    if result.run_dir is not None and result.run_dir.is_dir():
        result.gate_report = result.run_dir / layout.RUN_GATE_FILE
        result.gate_report.write_text(json.dumps(gate, indent=2) + "\n")
    if reports is not None:
        try:
            reports.record_retrain(name, run_id, result.outcome, gate)
        except ServiceError as exc:  # the store is down: the run's outcome stands, the file has it all
            logger.error("retrain %s: the gate report could not be stored: %s", name, exc)


def _run(
    repo: Path,
    name: str,
    store: FeedbackSource | None,
    screen: SourceScreen | None,
    serving: _Serving,
    settings: RetrainSettings,
    run_root: Path,
    result: RetrainResult,
) -> None:
    from modelloop.export.exporter import publish_staged, stage_export
    from modelloop.export.publish import staging_dir
    from modelloop.training.data import split_dataset
    from modelloop.training.spec import check_dataset, load_spec
    from modelloop.training.train import train

    spec = load_spec(serving.spec_source)
    data = check_dataset(spec.load_data(), spec)
    # The split train() makes (same spec, same seed): its training rows anchor the source cap,
    # its test rows are the fixed part of the evaluation.
    split = split_dataset(data, classification=spec.task != "regression", seed=serving.seed)
    verdicts = dict(screen.assess(name, serving.path)) if screen is not None and store is not None else {}
    quarantined = {source for source, verdict in verdicts.items() if verdict.quarantined}
    feedback = _feedback(store, name, spec, data, settings, quarantined, len(split.train))
    fb_train, fb_hold = feedback.train, feedback.holdout
    result.feedback_rows = {
        "train": len(fb_train.y),
        "holdout": len(fb_hold.y),
        "quarantined": feedback.quarantined_rows,
    }
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result.run_dir = run_root / "run"
    run_root.mkdir(parents=True, exist_ok=True)
    trained = train(
        spec, result.run_dir, epochs=settings.epochs, seed=serving.seed, extra=fb_train, interactive=False
    )

    # The trusted set: the test split the serving version was scored on, plus recent labels
    # from sources that are not quarantined, which neither model trained on.
    x_test, y_test = data.x[split.test], data.y[split.test]
    x_eval, y_eval = np.concatenate([x_test, fb_hold.x]), np.concatenate([y_test, fb_hold.y])
    sets = {
        "eval": (x_eval, y_eval),
        "test_split": (x_test, y_test),
        "feedback_holdout": (fb_hold.x, fb_hold.y),
        "eval_noisy": (_noisy(spec, data.x[split.train], x_eval, serving.seed), y_eval),
    }
    serving_onnx = serving.path / layout.ONNX_FILE
    if not serving_onnx.is_file():
        raise RetrainError(f"serving version {serving.version} has no model.onnx to compare with")
    metric = main_metric(spec.task)
    y_train = np.concatenate([data.y[split.train], fb_train.y])
    common = _common_sense(spec.task, y_train, sets["eval"][1])
    if spec.task == "regression":
        threshold = settings.mae_ceiling if settings.mae_ceiling is not None else common
    else:
        threshold = settings.accuracy_floor if settings.accuracy_floor is not None else common

    with staging_dir(repo) as staged_dir:
        staged = stage_export(trained.run_dir, staged_dir, name=name)
        x_eval, y_eval = sets["eval"]
        out_serving, out_candidate = (
            predict_onnx(serving_onnx, x_eval),
            predict_onnx(staged.onnx_path, x_eval),
        )
        result.metrics = {
            "serving": _score_sets(spec.task, serving_onnx, sets),
            "candidate": _score_sets(spec.task, staged.onnx_path, sets),
        }
        result.baseline = trained.metrics["strongest_baseline"]
        shallow = trained.baselines[result.baseline]
        result.metrics["baseline"] = {
            key: {**score(spec.task, y, shallow.predict(x)), "rows": len(y)}
            for key, (x, y) in sets.items()
            if len(y)
        }
        verdict = bless(
            spec.task,
            result.metrics["candidate"]["eval"][metric],
            result.metrics["serving"]["eval"][metric],
            threshold=threshold,
            tolerance=settings.tolerance,
        )
        robust = check_robustness(verdict, spec.task, result.metrics, settings)
        table = slice_table(
            spec.task,
            y_eval,
            out_serving,
            out_candidate,
            class_labels=list(data.class_labels),
            min_rows=settings.min_slice_rows,
            margin=settings.decile_margin if spec.task == "regression" else settings.class_margin,
        )
        sliced = slice_verdict(table)
        blessed = robust.blessed and not sliced
        # Every check that failed, so the report says all that is wrong with a candidate:
        # the aggregate, then the slices, then robustness (which runs on a blessed aggregate).
        unrobust = robust.reason if verdict.blessed and not robust.blessed else ""
        failed = [r for r in ([] if verdict.blessed else [verdict.reason]) + [sliced, unrobust] if r]
        result.reason = "; ".join(failed) or robust.reason
        # The report's "overall" is the aggregate check; the robustness verdict is its own entry.
        result.gate = _gate_report(name, serving, settings, verdict, table, sets, feedback, verdicts)
        result.gate["robustness"] = {"passed": robust.blessed or not verdict.blessed, "reason": unrobust}
        verdict = robust
        if not blessed:
            result.outcome = "rejected"
            return
        extra = {
            "blessing": {
                **asdict(verdict),
                "serving_version": serving.version,
                "eval_rows": len(sets["eval"][1]),
                "feedback_rows": result.feedback_rows,
                "metrics": result.metrics,
                "slices": table,
            }
        }
        published = publish_staged(staged, repo, extra_metadata=extra)
    result.outcome, result.version = "blessed", published.version


def _gate_report(
    name: str,
    serving: _Serving,
    settings: RetrainSettings,
    verdict: Blessing,
    table: dict[str, Any],
    sets: dict[str, tuple[np.ndarray, np.ndarray]],
    feedback: _Feedback,
    verdicts: Mapping[str, SourceVerdict],
) -> dict[str, Any]:
    """The gate's report: what was compared on which rows, and with which labels."""
    sources = []
    for source in sorted(set(feedback.sources) | set(verdicts)):
        entry: dict[str, Any] = {
            "source": source,
            "rows": 0,
            "unusable_rows": 0,
            "quarantined": False,
            "train_rows": 0,
            "train_rows_used": 0,
            "holdout_rows": 0,
        }
        entry.update(feedback.sources.get(source, {}))
        if source in verdicts:
            checks = verdicts[source].as_dict()
            entry["quarantined"] = bool(verdicts[source].quarantined)
            entry["reasons"] = checks.get("reasons", [])
            entry["checks"] = checks
        sources.append(entry)
    return {
        "model": name,
        "serving_version": serving.version,
        "overall": {
            "metric": verdict.metric,
            "rows": len(sets["eval"][1]),
            "serving": verdict.serving,
            "candidate": verdict.candidate,
            "threshold": verdict.threshold,
            "tolerance": verdict.tolerance,
            "passed": verdict.blessed,
            "reason": verdict.reason,
        },
        "slices": table,
        "eval_rows": {
            "test_split": len(sets["test_split"][1]),
            "feedback_holdout": len(sets["feedback_holdout"][1]),
        },
        "sources": sources,
        "settings": settings.model_dump(),
    }
