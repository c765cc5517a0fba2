"""The monitoring service: the prediction log, feedback, and the evaluation loop.

Built by the composition root with the server's ``CollectorRegistry``. Answered requests
reach it only through the prediction log: its :attr:`MonitoringService.ingest` reads the
log (when this service is the log's reader) into :attr:`MonitoringService.recorder`; the
REST edge calls :meth:`MonitoringService.submit_feedback` and :meth:`MonitoringService.status`.

Every ``eval_interval_s`` the service evaluates each AVAILABLE ``(model, version)``:

- drift of the version's input window against ``<repo>/<model>/<version>/baseline.json``
  (once the window holds ``min_rows`` rows), exported as ``modelloop_feature_drift``,
  ``modelloop_drift_detected``, ``modelloop_drift_share`` and ``modelloop_prediction_drift``;
- accuracy (classifiers) or MAE (regressors) over the last ``accuracy_window`` labelled
  rows from sources that are not quarantined, exported once ``min_labels`` rows exist;
- first, per model, the label checks of every labeler source against the latest available
  version (:mod:`~modelloop.monitoring.quarantine`), exported as
  ``modelloop_feedback_source_quarantined`` and ``modelloop_feedback_source_agreement``.
  Labels from a quarantined source are still stored, marked, counted under
  ``outcome="quarantined"`` and reported by :meth:`MonitoringService.source_report`.

Then it hands an :class:`EvaluationReport` per version to every listener. Listeners are
the hook for in-process alert rules (the retraining half registers one):

```python
def on_evaluation(model: str, version: int, report: EvaluationReport) -> None:
    if report.drift is not None and report.drift.drifted:
        policy_and_trigger(model, reason="drift")

service.add_listener(on_evaluation)
```

Listeners run on the event loop when the service runs (``start``), or in the caller's
thread for a direct :meth:`MonitoringService.evaluate_once`. They must return quickly
(start work with ``asyncio.create_task`` or a thread); an exception in one is logged and
does not stop the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from modelloop import layout
from modelloop.control.labelchecks import LabelChecks
from modelloop.control.retraining.policy import NewLabelsGate
from modelloop.errors import ServiceError
from modelloop.monitoring.accuracy import AccuracyReport, score_labelled
from modelloop.monitoring.drift import DriftDetector, DriftReport
from modelloop.monitoring.estimation import AccuracyEstimator, EstimateReport
from modelloop.monitoring.histogram import FeatureHistogram, feature_histograms
from modelloop.monitoring.history import LoggedTraffic, TrafficMeter, TrafficReport, history_point
from modelloop.monitoring.ingest import LogIngest
from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.predlog import PredictionLog
from modelloop.monitoring.predlog_store import SqlPredictionLog
from modelloop.monitoring.quality import QualityChecker, QualityReport
from modelloop.monitoring.quarantine import SourceVerdict, champion_of
from modelloop.monitoring.recorder import LogRecorder, VersionInfo
from modelloop.monitoring.report import EvaluationReport
from modelloop.monitoring.settings import (
    MonitoringSettings,
    resolve_model_settings,
)
from modelloop.monitoring.stores import StoreEngine, Stores, StoreUnavailable, open_stores
from modelloop.monitoring.stores.records import CLASSIFIER_TASKS, FeedbackItem, FeedbackResult
from modelloop.monitoring.window import WindowSet
from modelloop.serving.types import ModelCatalog, ModelState
from modelloop.tokens import ANONYMOUS_SOURCE

logger = logging.getLogger(__name__)


Listener = Callable[[str, int, EvaluationReport], None]
"""``listener(model, version, report)``: called after every evaluation of a version."""


@dataclass
class _VersionState:
    info: VersionInfo
    baseline: dict[str, Any] | None
    error: str = ""
    card: layout.ModelCard | None = None
    detectors: dict[tuple[float, float, float], DriftDetector] = field(default_factory=dict)
    estimator: AccuracyEstimator | None = None
    quality: QualityChecker | None = None

    def detector(self, settings: MonitoringSettings) -> DriftDetector:
        key = (settings.psi_threshold, settings.ks_pvalue, settings.drift_share)
        detector = self.detectors.get(key)
        if detector is None:
            if self.baseline is None:
                raise ValueError("no baseline")
            detector = self.detectors[key] = DriftDetector(
                self.baseline,
                psi_threshold=settings.psi_threshold,
                ks_pvalue=settings.ks_pvalue,
                drift_share=settings.drift_share,
            )
        return detector

    def feature_names(self) -> list[str]:
        if self.baseline is None:
            return []
        return [str(f.get("name", "")) for f in self.baseline.get("features", [])]


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


class MonitoringService:
    """Prediction log, feedback, drift and accuracy for every served model.

    Args:
        settings: Server-wide monitoring settings.
        repo: The model repository root (baselines are read from version directories).
        catalog: Which models and versions are loaded (the serving ``ModelRegistry``, seen
            through :class:`~modelloop.serving.types.ModelCatalog`).
        registry: The server's Prometheus registry.
        stores: The stores. Defaults to ``open_stores(settings.resolved_store_url())``.
        prune: Whether this process applies the store's retention (one worker of several
            does). Defaults to True.
        peer_wait_s: With several servers logging to one store, a label may arrive before
            the server that answered has written its buffer to the log; such ids are looked
            up once more after this wait. Defaults to 0 (one process: no wait).
        reads_log: Whether this service reads the prediction log (the control plane:
            one process per store). Others only join labels to what it stored. Defaults
            to False.
        traffic_from_log: Whether request rates and latencies come from the log rather
            than from serving metrics on ``registry`` (a control plane has none). Defaults
            to False.
        open_log: Opens the prediction log over the SQL store (which keeps its reader's
            position), e.g. objects under a prefix. Defaults to None: the store's own table.

    Raises:
        StoreUnavailable: The default SQLite store cannot be opened.

    Example:
        >>> service = MonitoringService(MonitoringSettings(), repo=repo, catalog=models, registry=registry)
        >>> await service.start()
        >>> service.status("digits")  # {1: EvaluationReport(...)}
        >>> await service.stop()
    """

    def __init__(
        self,
        settings: MonitoringSettings,
        *,
        repo: Path,
        catalog: ModelCatalog,
        registry: CollectorRegistry,
        stores: Stores | None = None,
        prune: bool = True,
        peer_wait_s: float = 0.0,
        reads_log: bool = False,
        traffic_from_log: bool = False,
        open_log: Callable[[StoreEngine], PredictionLog[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.prune = prune
        self.peer_wait_s = peer_wait_s
        self.repo = Path(repo)
        self.catalog = catalog
        self.registry = registry
        self.metrics = MonitoringMetrics(registry)
        self.stores: Stores = (
            stores
            if stores is not None
            else open_stores(
                settings.resolved_store_url(),
                retention_rows=settings.retention_rows,
                retention_days=settings.retention_days,
            )
        )
        self.windows = WindowSet(settings.window_size)
        self.recorder = LogRecorder(
            self.stores.predictions,
            self.windows,
            self.version_info,
            sample_features=settings.sample_features,
        )
        # The prediction log the servers write (the SQL store's, or `open_log`'s over it):
        # read here when this service is the control plane, and waited for before a label
        # is joined.
        engine = self.stores.engine
        self.log: PredictionLog[Any] = open_log(engine) if open_log is not None else SqlPredictionLog(engine)
        logged = LoggedTraffic() if traffic_from_log else None
        self.ingest: LogIngest | None = (
            LogIngest(self.log, self.recorder, self.metrics, prune=prune, traffic=logged)
            if reads_log
            else None
        )
        # Set by the composition root to the local logger's flush, so that a label posted
        # right after its prediction finds it.
        self.before_flush: Callable[[float], bool] | None = None
        self._versions: dict[tuple[str, int], _VersionState] = {}
        self._reports: dict[tuple[str, int], EvaluationReport] = {}
        self._listeners: list[Listener] = []
        self._bad_overrides: dict[str, str] = {}
        self.label_checks = LabelChecks(
            settings.quarantine, catalog=catalog, feedback=self.stores.feedback, metrics=self.metrics
        )
        self._task: asyncio.Task[None] | None = None
        # The retraining half's label gate, when retraining is on (the health page shows its skips).
        self.retrain_gate: NewLabelsGate | None = None
        self._last_prune = 0.0
        self.traffic = (
            TrafficMeter(logged.registry, errors=False) if logged is not None else TrafficMeter(registry)
        )
        self._traffic: dict[tuple[str, int], TrafficReport] = {}

    # -- listeners -------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Registers ``listener(model, version, report)``, called after each evaluation.

        Args:
            listener: A quick, non-blocking callable (see the module docstring).
        """
        self._listeners.append(listener)

    def _notify(self, reports: Sequence[EvaluationReport]) -> None:
        for report in reports:
            for listener in list(self._listeners):
                try:
                    listener(report.model, report.version, report)
                except Exception:  # one broken rule must not silence the others
                    logger.exception("monitoring listener %r failed", listener)

    # -- versions --------------------------------------------------------------------

    def _state(self, model: str, version: int) -> _VersionState:
        key = (model, version)
        state = self._versions.get(key)
        if state is not None:
            return state
        version_dir = self.repo / model / str(version)
        info = VersionInfo()
        card: layout.ModelCard | None = None
        try:
            card = layout.read_model_card(version_dir)
            task = card.task or "multiclass"
            info = VersionInfo(
                task=task,
                classes=len(card.labels) if task in CLASSIFIER_TASKS else 0,
                output_name=card.outputs[0].name,
            )
        except layout.LayoutError as exc:
            logger.warning("model %s version %d: %s", model, version, exc)
        baseline: dict[str, Any] | None = None
        error = ""
        try:
            baseline = _read_json(version_dir / layout.BASELINE_FILE)
            DriftDetector(baseline)  # fail now, once, on a malformed baseline
            classes = info.classes or (2 if info.task == "binary" else 0)
            info = VersionInfo(info.task, classes, baseline.get("input"), info.output_name)
        except FileNotFoundError:
            error = f"no {layout.BASELINE_FILE} in {model}/{version}: drift is not computed"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            baseline, error = None, f"bad {layout.BASELINE_FILE} in {model}/{version}: {exc}"
        if error:
            logger.warning("model %s version %d: %s", model, version, error)
        state = self._versions[key] = _VersionState(info, baseline, error, card)
        return state

    def version_info(self, model: str, version: int) -> VersionInfo:
        """How to read one version's requests (task, classes, input and output names)."""
        return self._state(model, version).info

    def _settings_for(self, model: str) -> MonitoringSettings:
        try:
            overrides = self.catalog.model_options(model, "drift")
            resolved = resolve_model_settings(self.settings, overrides)
        except ValueError as exc:
            if self._bad_overrides.get(model) != str(exc):
                logger.error("model %s: config.json %s; using the server's thresholds", model, exc)
                self._bad_overrides[model] = str(exc)
            return self.settings
        except ServiceError:  # an unknown model: the server's thresholds apply
            return self.settings
        self._bad_overrides.pop(model, None)
        return resolved

    def assess_sources(self, model: str, version: int) -> dict[str, SourceVerdict]:
        """Runs the label checks of a model's sources against one version (its champion).

        See :meth:`~modelloop.control.labelchecks.LabelChecks.assess`.

        Returns:
            Source -> verdict; empty for regressors (they have no confidence to check).
        """
        state = self._state(model, version)
        if state.info.task not in CLASSIFIER_TASKS:
            return {}
        return self.label_checks.assess(model, version, champion_of(version, state.card, state.baseline))

    def quarantined_sources(self, model: str) -> set[str]:
        """The sources of a model quarantined at the last label check."""
        return self.label_checks.quarantined(model)

    def quarantine_reasons(self, model: str) -> dict[str, list[str]]:
        """The sources of a model quarantined at the last label check, each with why."""
        return self.label_checks.quarantine_reasons(model)

    def source_report(self, model: str) -> dict[str, Any]:
        """Every labeler source of a model: its labels, agreement, confusion and quarantine.

        Raises:
            StoreUnavailable: The store cannot be reached.
        """
        return self.label_checks.report(model)

    def _loaded(self) -> list[tuple[str, int]]:
        loaded: list[tuple[str, int]] = []
        for name in self.catalog.model_names():
            try:
                statuses = self.catalog.statuses(name)
            except ServiceError:  # the model vanished between the two calls
                continue
            loaded.extend((name, s.version) for s in statuses if s.state is ModelState.AVAILABLE)
        return loaded

    # -- evaluation ------------------------------------------------------------------

    def evaluate_version(self, model: str, version: int) -> EvaluationReport:
        """Evaluates one version now and updates its gauges (no listeners called).

        Args:
            model: Model name.
            version: Version.

        Returns:
            The report.
        """
        settings = self._settings_for(model)
        state = self._state(model, version)
        rows, predicted = self.windows.get(model, version).snapshot()
        v = str(version)
        self.metrics.window_rows.labels(model, v).set(len(rows))
        drift: DriftReport | None = None
        drift_error = state.error
        if state.baseline is not None and len(rows) >= settings.min_rows:
            try:
                detector = state.detector(settings)
                drift = detector.evaluate(rows, predicted[np.isfinite(predicted)])
            except ValueError as exc:
                drift_error = str(exc)
        if drift is not None:
            for f in drift.features:
                self.metrics.feature_drift.labels(model, v, f.name, "psi").set(f.psi)
                if f.ks is not None:
                    self.metrics.feature_drift.labels(model, v, f.name, "ks").set(f.ks)
            self.metrics.drift_detected.labels(model, v).set(1 if drift.drifted else 0)
            self.metrics.drift_share.labels(model, v).set(drift.share)
            if drift.prediction_psi is not None:
                self.metrics.prediction_drift.labels(model, v).set(drift.prediction_psi)
        accuracy: AccuracyReport | None = None
        labels: int | None = None
        store_error = ""
        try:
            recent = self.stores.feedback.recent_labelled(
                model, version, settings.accuracy_window, exclude_sources=self.quarantined_sources(model)
            )
            labels = self.stores.feedback.count_labels(model, version)
            accuracy = score_labelled(recent, task=state.info.task, min_labels=settings.min_labels)
        except StoreUnavailable as exc:
            store_error = exc.message
        if accuracy is not None and accuracy.ready and accuracy.value is not None:
            gauge = (
                self.metrics.accuracy if accuracy.metric == "accuracy" else self.metrics.mean_absolute_error
            )
            gauge.labels(model, v).set(accuracy.value)
        estimate, estimate_note = self._estimate(model, version, state, settings)
        quality, histograms = self._check_quality(model, version, state, rows, settings, drift)
        report = EvaluationReport(
            model=model,
            version=version,
            task=state.info.task,
            evaluated_at=time.time(),
            window_rows=len(rows),
            min_rows=settings.min_rows,
            drift=drift,
            drift_error=drift_error,
            accuracy=accuracy,
            labels=labels,
            store_error=store_error,
            settings=settings,
            estimate=estimate,
            estimate_note=estimate_note,
            quality=quality,
            histograms=histograms,
            traffic=self._traffic.get((model, version)),
        )
        self._reports[(model, version)] = report
        return report

    def _evaluate_all(self) -> list[EvaluationReport]:
        loaded = self._loaded()
        champions: dict[str, int] = {}
        for model, version in loaded:
            champions[model] = max(version, champions.get(model, 0))
        for model, version in sorted(champions.items()):
            try:
                self.assess_sources(model, version)
            except Exception:  # one broken model must not stop the others
                logger.exception("label checks of model %s failed", model)
        self._traffic = self.traffic.measure()
        reports = []
        for model, version in loaded:
            try:
                reports.append(self.evaluate_version(model, version))
            except Exception:  # one broken version must not stop the others
                logger.exception("evaluating model %s version %d failed", model, version)
        self._record_history(reports)
        current = set(loaded)
        gone = {k for k in (*self._reports, *self.windows.keys()) if k not in current}
        for key in sorted(gone):
            state = self._versions.pop(key, None)
            self._reports.pop(key, None)
            self.windows.discard(*key)
            self.metrics.forget_version(key[0], key[1], state.feature_names() if state else [])
        now = time.monotonic()
        if self.prune and now - self._last_prune >= self.settings.prune_interval_s:
            self._last_prune = now
            try:
                pruned = self.stores.predictions.prune()
                if pruned:
                    logger.info("pruned %d logged predictions beyond retention", pruned)
                self.stores.history.prune_history(
                    retention_days=self.settings.history_retention_days,
                    max_points=self.settings.history_max_points,
                )
            except StoreUnavailable as exc:
                logger.warning("retention pass failed: %s", exc)
        return reports

    def evaluate_once(self) -> list[EvaluationReport]:
        """Evaluates every AVAILABLE version, updates the gauges and calls the listeners.

        Returns:
            One report per evaluated version.
        """
        reports = self._evaluate_all()
        self._notify(reports)
        return reports

    def status(self, model: str) -> dict[int, EvaluationReport]:
        """The latest report of each evaluated version of a model (for the status page)."""
        return {v: r for (m, v), r in sorted(self._reports.items()) if m == model}

    def _estimate(
        self, model: str, version: int, state: _VersionState, settings: MonitoringSettings
    ) -> tuple[EstimateReport | None, str]:
        """The label-free accuracy estimate of the window's outputs, or why there is none."""
        if state.estimator is None:
            state.estimator = AccuracyEstimator.from_baseline(state.baseline, task=state.info.task)
            if not state.estimator.available:
                logger.info("model %s version %d: %s", model, version, state.estimator.reason)
        if not state.estimator.available:
            return None, state.estimator.reason
        outputs = self.windows.get(model, version).outputs()
        if len(outputs) < settings.min_rows:
            return None, f"collecting ({len(outputs)}/{settings.min_rows} rows)"
        try:
            estimate = state.estimator.estimate(outputs)
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"the calibrator does not fit the outputs: {exc}"
        if estimate is None:
            return None, "no finite outputs in the window"
        v = str(version)
        self.metrics.estimated_accuracy.labels(model, v).set(estimate.value)
        self.metrics.estimated_accuracy_lower.labels(model, v).set(estimate.lower)
        self.metrics.estimated_accuracy_upper.labels(model, v).set(estimate.upper)
        return estimate, ""

    def _check_quality(
        self,
        model: str,
        version: int,
        state: _VersionState,
        rows: np.ndarray,
        settings: MonitoringSettings,
        drift: DriftReport | None,
    ) -> tuple[QualityReport | None, tuple[FeatureHistogram, ...]]:
        """Data quality of the window, and the histograms of its top drifted features."""
        if state.baseline is None or len(rows) < settings.min_rows:
            return None, ()
        try:
            if state.quality is None:
                state.quality = QualityChecker(state.baseline)
            quality = state.quality.evaluate(rows)
        except ValueError as exc:  # a window of another width: drift says so too
            logger.debug("model %s version %d: no data quality: %s", model, version, exc)
            return None, ()
        v = str(version)
        for f in quality.features:
            self.metrics.feature_missing_share.labels(model, v, f.name).set(f.missing_share)
            self.metrics.feature_out_of_range_share.labels(model, v, f.name).set(f.out_of_range_share)
        self.metrics.features_became_constant.labels(model, v).set(len(quality.became_constant))
        # Features that varied in training first: their histograms say more than a
        # constant's "equal / other".
        ranked = sorted(drift.features, key=lambda f: (not f.drifted, f.constant, -f.psi)) if drift else []
        top = [f.name for f in ranked[:3]]
        return quality, feature_histograms(state.baseline, rows, top)

    def _record_history(self, reports: Sequence[EvaluationReport]) -> None:
        """Stores one history point per evaluation; a store outage loses points, not evaluations."""
        points = [history_point(r, r.traffic) for r in reports]
        try:
            self.stores.history.record_history(points)
        except StoreUnavailable as exc:
            logger.warning("history not recorded (%d points): %s", len(points), exc.message)

    def history(self, model: str, *, since: float, limit: int) -> dict[int, list[dict[str, Any]]]:
        """The stored history of a model's versions (blocking; the route runs it in a thread).

        Args:
            model: Model name.
            since: Unix time of the oldest point wanted.
            limit: Most points per version (the newest are kept).

        Returns:
            Version -> points (``{"t": ..., "accuracy": ..., ...}``), oldest first.

        Raises:
            StoreUnavailable: The store cannot be reached.
        """
        return {
            v: [p.as_dict() for p in points]
            for v, points in self.stores.history.history(model, since=since, limit=limit).items()
        }

    def retrain_runs(self, model: str) -> dict[str, int]:
        """Retraining runs of a model by outcome, as this process counted them."""
        runs: dict[str, int] = {}
        for outcome in ("blessed", "rejected", "failed"):
            # The registry the monitoring metrics live on (the traffic meter may read another).
            value = self.registry.get_sample_value(
                "modelloop_retrain_runs_total", {"model": model, "outcome": outcome}
            )
            runs[outcome] = int(value or 0)
        return runs

    # -- feedback --------------------------------------------------------------------

    def has_model(self, model: str) -> bool:
        """Whether the model is in the repository."""
        return self.catalog.has_model(model)

    def add_feedback(
        self, model: str, items: Sequence[FeedbackItem], source: str = ANONYMOUS_SOURCE
    ) -> FeedbackResult:
        """Joins labels to logged predictions and stores them durably under their source (blocking).

        The log is read up to the predictions answered before the call first
        (:meth:`catch_up`), so a label posted right after its prediction is found. Labels
        of a quarantined source are stored and marked; the result says so.

        Args:
            model: The model named in the route.
            items: Labels by request id.
            source: The authenticated labeler. Defaults to ``anonymous``.

        Returns:
            What was accepted, unknown, duplicate, ambiguous or invalid.

        Raises:
            StoreUnavailable: The store cannot be reached; nothing was stored.
        """
        if not self.catch_up(timeout=5.0):
            logger.warning("feedback for %s: the prediction log is behind; recent ids may be unknown", model)
        quarantined = source in self.quarantined_sources(model)
        result = self.stores.feedback.add_feedback(model, items, source=source, quarantined=quarantined)
        if result.unknown and self.peer_wait_s > 0:
            # Another server (a worker, a replica) may hold the prediction in its logger's
            # buffer: it writes every fraction of a second. Read the log again after that.
            time.sleep(self.peer_wait_s)
            self.catch_up(timeout=5.0)
            unknown = set(result.unknown)
            retry = self.stores.feedback.add_feedback(
                model,
                [item for item in items if item.request_id in unknown],
                source=source,
                quarantined=quarantined,
            )
            result.unknown = retry.unknown
            result.accepted += retry.accepted
            result.duplicate += retry.duplicate
            result.invalid.update(retry.invalid)
            result.ambiguous.update(retry.ambiguous)
            for version, count in retry.labels.items():
                result.labels[version] = result.labels.get(version, 0) + count
            # Every first-round unknown was asked again: the retry's count replaces it.
            result.rows.pop(("", "unknown"), None)
            for key, rows in retry.rows.items():
                result.rows[key] = result.rows.get(key, 0) + rows
        for (version, outcome), rows in result.rows.items():
            self.metrics.feedback.labels(model, version, source, outcome).inc(rows)
        return result

    def catch_up(self, timeout: float = 5.0) -> bool:
        """Waits until every prediction answered before this call is stored (blocking).

        The local logger writes what it holds, then the log is read up to its end (by this
        service when it reads the log, else by the control plane: the cursor is watched).

        Returns:
            Whether it was, in time.
        """
        deadline = time.monotonic() + timeout
        done = True
        if self.before_flush is not None:
            done = self.before_flush(max(deadline - time.monotonic(), 0.0)) and done
        if self.ingest is not None:
            return self.ingest.catch_up(max(deadline - time.monotonic(), 0.0)) and done
        try:
            target = self.log.last()
            while not self.log.reached(self.log.cursor(), target):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
        except StoreUnavailable:
            return False
        return done

    async def submit_feedback(
        self, model: str, items: Sequence[FeedbackItem], source: str = ANONYMOUS_SOURCE
    ) -> FeedbackResult:
        """:meth:`add_feedback` in a worker thread, for the event loop."""
        return await asyncio.to_thread(self.add_feedback, model, items, source)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the log reader and the evaluation loop."""
        if self.ingest is not None:
            self.ingest.start()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="monitoring-evaluator")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.eval_interval_s)
            try:
                reports = await asyncio.to_thread(self._evaluate_all)
            except Exception:
                logger.exception("monitoring evaluation failed")
                continue
            self._notify(reports)

    async def stop(self) -> None:
        """Stops the loop, stores what the log holds, and closes the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.ingest is not None:
            # What the servers logged before they stopped is stored before the store closes.
            await asyncio.to_thread(self.ingest.catch_up, 5.0)
            await asyncio.to_thread(self.ingest.stop)
        self.stores.close()
