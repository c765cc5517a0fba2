"""The history of each model version: one point per evaluation, kept in the store.

Every evaluation of a version (every ``eval_interval_s``) becomes one point: accuracy
and the label-free estimate, drift share, the top drifted features and prediction drift,
data quality, and the request rate, error rate and p99 latency since the previous
evaluation. The history store (:mod:`~modelloop.monitoring.stores.history`) keeps the points
in a ``history`` table, bounded by age and by a number of points per version, and
``GET /monitoring/models/{model}/history?since=UNIX_SECONDS`` serves them.

Traffic comes from the server's own Prometheus registry (the ``modelloop_requests_total``
and ``modelloop_request_duration_seconds`` series of the design's contract), differenced
between two evaluations, so monitoring needs nothing of serving beyond those names.

Example:

```python
point = history_point(report, traffic=meter.measure().get(("digits", 1)))
stores.history.record_history([point])
stores.history.history("digits", since=time.time() - 3600, limit=2000)  # {1: [HistoryPoint, ...]}
```
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

if TYPE_CHECKING:
    from modelloop.monitoring.report import EvaluationReport


# The codes the ModelHighErrorRate rule counts: failures on the server's side.
SERVER_ERROR_CODES = frozenset(
    {"INTERNAL", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS"}
)
_REQUESTS = "modelloop_requests"
_DURATION = "modelloop_request_duration_seconds"


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One evaluation of one version.

    Attributes:
        model: Model name.
        version: Version.
        t: Unix time of the evaluation.
        values: The series' values at ``t`` (see :func:`history_point`); None where a
            series had no value.
    """

    model: str
    version: int
    t: float
    values: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The point as the history route answers it: ``{"t": ..., <series>: ...}``."""
        return {"t": self.t, **self.values}


@dataclass(frozen=True, slots=True)
class TrafficReport:
    """Requests to one version between two evaluations.

    Attributes:
        request_rate: Requests per second, whatever their outcome.
        error_rate: Share of those that failed on the server's side, or None without requests.
        p99_seconds: 99th percentile duration from the histogram's buckets, or None
            without requests.
    """

    request_rate: float
    error_rate: float | None
    p99_seconds: float | None


@dataclass
class _Totals:
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] | None = None


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative bucket counts ``{le: count}``."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound  # the +Inf bucket: the highest finite bound, as Prometheus does
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


_LOGGED_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class LoggedTraffic:
    """Request counts and latencies of the logged requests, for a control plane's history.

    A control plane has no serving metrics of its own: it counts what it reads from the
    prediction log (answered requests and their ``latency_s``) in a private registry, under
    the serving metrics' names, so that :class:`TrafficMeter` reads it as it reads a
    server's. Failed requests are not logged: their rate stays on the servers' ``/metrics``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            _REQUESTS, "Logged requests.", ["model", "version", "code"], registry=self.registry
        )
        self._duration = Histogram(
            _DURATION,
            "Logged latencies.",
            ["model", "version"],
            buckets=_LOGGED_BUCKETS,
            registry=self.registry,
        )

    def add(self, model: str, version: int, latencies: np.ndarray) -> None:
        """Counts answered requests of one version with their latencies in seconds."""
        v = str(version)
        self._requests.labels(model, v, "OK").inc(len(latencies))
        histogram = self._duration.labels(model, v)
        for seconds in latencies.tolist():
            histogram.observe(seconds)


class TrafficMeter:
    """Request rate, error rate and p99 per version, from the server's Prometheus registry.

    Each :meth:`measure` differences the counters against the previous call.

    Args:
        registry: The registry the serving metrics live on.
        errors: Whether the registry counts failed requests (a control plane's logged
            traffic does not: its error rate is unknown, not 0). Defaults to True.
    """

    def __init__(self, registry: CollectorRegistry, *, errors: bool = True) -> None:
        self.registry = registry
        self.errors = errors
        self._previous: dict[tuple[str, int], _Totals] = {}
        self._previous_t: float | None = None

    def _totals(self) -> dict[tuple[str, int], _Totals]:
        totals: dict[tuple[str, int], _Totals] = {}
        for family in self.registry.collect():
            if family.name not in (_REQUESTS, _DURATION):
                continue
            for sample in family.samples:
                version = sample.labels.get("version", "")
                if not version.isdigit():
                    continue  # a request that resolved no version
                entry = totals.setdefault((sample.labels.get("model", ""), int(version)), _Totals())
                if sample.name == f"{_REQUESTS}_total":
                    entry.requests += sample.value
                    if sample.labels.get("code") in SERVER_ERROR_CODES:
                        entry.errors += sample.value
                elif sample.name == f"{_DURATION}_bucket":
                    if entry.buckets is None:
                        entry.buckets = {}
                    le = float(sample.labels["le"])
                    entry.buckets[le] = entry.buckets.get(le, 0.0) + sample.value
        return totals

    def measure(self, now: float | None = None) -> dict[tuple[str, int], TrafficReport]:
        """The traffic of every version since the previous call (nothing on the first).

        Args:
            now: Monotonic seconds. Defaults to ``time.monotonic()``.

        Returns:
            One report per version that has request counters.
        """
        now = time.monotonic() if now is None else now
        totals = self._totals()
        previous, previous_t = self._previous, self._previous_t
        self._previous, self._previous_t = totals, now
        if previous_t is None or now <= previous_t:
            return {}
        elapsed = now - previous_t
        reports: dict[tuple[str, int], TrafficReport] = {}
        for key, current in totals.items():
            before = previous.get(key, _Totals())
            # A counter never goes down; a smaller value is a new series after a restart.
            requests = max(current.requests - before.requests, 0.0)
            errors = max(current.errors - before.errors, 0.0)
            p99: float | None = None
            if requests > 0 and current.buckets:
                old = before.buckets or {}
                p99 = _quantile(
                    0.99, {le: max(c - old.get(le, 0.0), 0.0) for le, c in current.buckets.items()}
                )
            reports[key] = TrafficReport(
                request_rate=requests / elapsed,
                error_rate=errors / requests if requests > 0 and self.errors else None,
                p99_seconds=p99,
            )
        return reports


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def history_point(report: EvaluationReport, traffic: TrafficReport | None = None) -> HistoryPoint:
    """The history point of one evaluation.

    Args:
        report: The evaluation.
        traffic: The version's traffic since the previous evaluation. Defaults to None.

    Returns:
        The point, with every series of the history route (None where there is no value).
    """
    accuracy = report.accuracy
    ready = accuracy is not None and accuracy.ready and accuracy.value is not None
    values: dict[str, Any] = {
        "accuracy": _round(accuracy.value) if ready and accuracy and accuracy.metric == "accuracy" else None,
        "mae": _round(accuracy.value) if ready and accuracy and accuracy.metric == "mae" else None,
        "labels": report.labels,
        "estimated_accuracy": None,
        "estimated_accuracy_lower": None,
        "estimated_accuracy_upper": None,
        "drift_share": None,
        "drift_detected": None,
        "top_drifted_features": [],
        "prediction_drift": None,
        "missing_share": None,
        "out_of_range_share": None,
        "constant_features": [],
        "worst_quality_features": [],
        "request_rate": None,
        "error_rate": None,
        "p99_seconds": None,
        "window_rows": report.window_rows,
    }
    if report.estimate is not None:
        values["estimated_accuracy"] = _round(report.estimate.value)
        values["estimated_accuracy_lower"] = _round(report.estimate.lower)
        values["estimated_accuracy_upper"] = _round(report.estimate.upper)
    if report.drift is not None:
        values["drift_share"] = _round(report.drift.share)
        values["drift_detected"] = bool(report.drift.drifted)
        values["top_drifted_features"] = [
            {"feature": f.name, "psi": _round(f.psi, 4)} for f in report.drift.top(3) if f.drifted
        ]
        values["prediction_drift"] = _round(report.drift.prediction_psi)
    if report.quality is not None:
        quality = report.quality
        values["missing_share"] = _round(quality.max_missing_share)
        values["out_of_range_share"] = _round(quality.max_out_of_range_share)
        values["constant_features"] = quality.became_constant
        worst = {f.name: f for key in ("missing_share", "out_of_range_share") for f in quality.worst(key)}
        values["worst_quality_features"] = [
            {
                "feature": f.name,
                "missing_share": _round(f.missing_share, 4),
                "out_of_range_share": _round(f.out_of_range_share, 4),
            }
            for f in worst.values()
        ]
    if traffic is not None:
        values["request_rate"] = _round(traffic.request_rate, 4)
        values["error_rate"] = _round(traffic.error_rate)
        values["p99_seconds"] = _round(traffic.p99_seconds)
    return HistoryPoint(report.model, report.version, report.evaluated_at, values)
