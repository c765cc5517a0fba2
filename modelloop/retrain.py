"""Feedback-augmented retraining with a TFX-style blessing gate.

``retrain(repo, name, store)`` closes the loop for one model:

1. Read the serving (latest) version's ``model.json``: which spec trained it, with which seed.
2. Load the spec's data and the labelled feedback rows from the prediction store. The most
   recent ``holdout_fraction`` of the feedback is held out for the evaluation; the rest is
   appended to the training part.
3. Train, export to a staging directory and check parity. Nothing is published yet.
4. Gate on a fixed evaluation set: the original test split (regenerated from the spec with
   the recorded seed) plus the held-out feedback rows. Both the serving version and the
   candidate are scored with ONNX Runtime on exactly the same rows. The candidate is
   blessed when it clears an absolute floor (accuracy floor or MAE ceiling) and is not
   worse than the serving version by more than ``tolerance``, and then passes the
   robustness checks (:func:`check_robustness`): on the same rows under Gaussian noise it
   is not much worse than the serving version, and on the clean rows it is not much worse
   than the strongest shallow baseline trained on the same rows. "Much worse" is more than
   ``much_worse_accuracy`` (0.05) below in accuracy, or more than ``much_worse_mae_ratio``
   (10 %) above in MAE.
5. Publish a blessed candidate as version v+1; servers pick it up on their next poll.

Every run ends with one outcome, ``blessed``, ``rejected`` or ``failed``, logged with
its metrics, written as a JSON record under ``<state_dir>/retrain/<name>/`` and counted in
``modelloop_retrain_runs_total{model,outcome}`` when a counter is passed in.

Example:

```python
result = retrain(Path("models"), "digits", store=open_store("sqlite:///.modelloop/modelloop.db"))
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
from modelloop.errors import ModelloopError
from modelloop.training.evaluation import higher_is_better, main_metric, score
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
    """Where labelled feedback rows come from (the monitoring ``PredictionStore``)."""

    def feedback_dataset(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ``[n, features]`` and targets ``[n]`` of labelled rows, oldest first."""
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
    """Share of the most recent labelled rows kept out of training, for the evaluation set."""
    max_feedback_rows: int = Field(default=100_000, ge=0)
    """Most recent labelled rows used at all; older ones are ignored."""
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
        feedback_rows: Labelled rows used: ``train`` and ``holdout``.
        seconds: Wall time of the run.
        record: The JSON run record written under the state directory.
        run_dir: The training run directory.
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
    seconds: float = 0.0
    record: Path | None = None
    run_dir: Path | None = None
    baseline: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-serialisable data."""
        data = asdict(self)
        data["record"] = str(self.record) if self.record else None
        data["run_dir"] = str(self.run_dir) if self.run_dir else None
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


def _feedback(
    store: FeedbackSource | None, name: str, spec: TaskSpec, data: Dataset, settings: RetrainSettings
) -> tuple[Dataset, Dataset]:
    """Splits usable labelled rows into (train, holdout); the holdout is the most recent slice."""
    empty = Dataset(
        x=np.zeros((0, data.x.shape[1]), np.float32),
        y=np.zeros((0,), data.y.dtype),
        feature_names=data.feature_names,
        class_labels=data.class_labels,
    )
    if store is None or settings.max_feedback_rows == 0:
        return empty, empty
    x, y = store.feedback_dataset(name)
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    if x.ndim != 2 or len(x) == 0:
        return empty, empty
    if x.shape[1] != data.x.shape[1]:
        # The store keeps a bounded sample of columns; rows without every feature cannot train.
        logger.warning(
            "retrain %s: feedback rows have %d features, the spec %d; feedback not used",
            name,
            x.shape[1],
            data.x.shape[1],
        )
        return empty, empty
    y = y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
    keep = np.isfinite(y) & np.all(np.isfinite(x), axis=1)
    if spec.task != "regression":
        n_classes = max(len(data.class_labels), int(data.y.max()) + 1)
        keep &= (y == np.round(y)) & (y >= 0) & (y < n_classes)
    x, y = x[keep][-settings.max_feedback_rows :], y[keep][-settings.max_feedback_rows :]
    y = y.astype(data.y.dtype)
    n_hold = math.ceil(len(y) * settings.holdout_fraction) if len(y) >= 2 else 0
    cut = len(y) - n_hold

    def part(rows: slice) -> Dataset:
        return Dataset(x=x[rows], y=y[rows], feature_names=data.feature_names, class_labels=data.class_labels)

    return part(slice(0, cut)), part(slice(cut, None))


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
    store: FeedbackSource | None = None,
    *,
    state_dir: Path = Path(".modelloop"),
    settings: RetrainSettings | None = None,
    runs_total: Counter | None = None,
) -> RetrainResult:
    """Retrains one model on its spec's data plus feedback, gates it, and publishes it if blessed.

    Args:
        repo: The model repository root.
        name: The model to retrain; its latest version is "serving".
        store: Labelled feedback (``feedback_dataset(name)``). Defaults to None (spec data only).
        state_dir: Where run directories and JSON run records go. Defaults to ``.modelloop``.
        settings: Gate and training knobs. Defaults to ``config.json``'s ``"retrain"`` block.
        runs_total: ``modelloop_retrain_runs_total`` (labels ``model``, ``outcome``) to count
            the outcome in. Defaults to None.

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
            _run(repo, name, store, serving, settings, out_dir / run_id, result)
        except Exception as exc:
            # Any crash (training, export, parity, store) is a failed run: recorded and counted.
            logger.exception("retrain %s failed", name)
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            result.outcome, result.version = "failed", None
            result.reason = f"{type(exc).__name__}: {first_line}".rstrip(": ")
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


def _run(
    repo: Path,
    name: str,
    store: FeedbackSource | None,
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
    fb_train, fb_hold = _feedback(store, name, spec, data, settings)
    result.feedback_rows = {"train": len(fb_train.y), "holdout": len(fb_hold.y)}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result.run_dir = run_root / "run"
    run_root.mkdir(parents=True, exist_ok=True)
    trained = train(
        spec, result.run_dir, epochs=settings.epochs, seed=serving.seed, extra=fb_train, interactive=False
    )

    # The fixed evaluation set: the test split the serving version was scored on (same
    # spec, same seed), plus recent labelled traffic neither model trained on.
    split = split_dataset(data, classification=spec.task != "regression", seed=serving.seed)
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
        verdict = check_robustness(verdict, spec.task, result.metrics, settings)
        result.reason = verdict.reason
        if not verdict.blessed:
            result.outcome = "rejected"
            return
        extra = {
            "blessing": {
                **asdict(verdict),
                "serving_version": serving.version,
                "eval_rows": len(sets["eval"][1]),
                "feedback_rows": result.feedback_rows,
                "metrics": result.metrics,
            }
        }
        published = publish_staged(staged, repo, extra_metadata=extra)
    result.outcome, result.version = "blessed", published.version
