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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from modelloop import layout
from modelloop.control.retraining.gate import (
    Blessing,
    bless,
    check_robustness,
    common_sense_score,
    noisy_rows,
    predict_onnx,
    score_sets,
    slice_table,
    slice_verdict,
)
from modelloop.control.retraining.settings import RetrainError, RetrainSettings
from modelloop.errors import ServiceError
from modelloop.training.evaluation import main_metric, score
from modelloop.training.spec import Dataset, TaskSpec

if TYPE_CHECKING:
    from prometheus_client import Counter

logger = logging.getLogger(__name__)

Outcome = Literal["blessed", "rejected", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("blessed", "rejected", "failed")
RETRAIN_DIR = "retrain"


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
        "eval_noisy": (noisy_rows(spec, data.x[split.train], x_eval, serving.seed), y_eval),
    }
    serving_onnx = serving.path / layout.ONNX_FILE
    if not serving_onnx.is_file():
        raise RetrainError(f"serving version {serving.version} has no model.onnx to compare with")
    metric = main_metric(spec.task)
    y_train = np.concatenate([data.y[split.train], fb_train.y])
    common = common_sense_score(spec.task, y_train, sets["eval"][1])
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
            "serving": score_sets(spec.task, serving_onnx, sets),
            "candidate": score_sets(spec.task, staged.onnx_path, sets),
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
