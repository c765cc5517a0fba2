"""Prometheus metrics of the serving core, on an injected registry.

Every metric lives on the ``CollectorRegistry`` passed in, never on the global one, so
tests and several servers in one process never share counters. Names follow DESIGN.md.

Example:

```python
registry = CollectorRegistry()
metrics = ServingMetrics(registry)
metrics.observe_request("digits", 1, Protocol.V2_REST, "OK", 0.004)
registry.get_sample_value(
    "modelloop_requests_total",
    {"model": "digits", "version": "1", "protocol": "v2_rest", "code": "OK"},
)  # 1.0
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from modelloop.serving.statistics import InferenceStatistics

WORKER_POOL_FILE = "workers.json"
"""The file in the multiprocess metrics directory where the supervisor keeps the pool's state."""

# Seconds. Inference on small models takes well under a millisecond, so start low.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_QUEUE_BUCKETS = (
    0.00001,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    1.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _label(value: object) -> str:
    # Protocol and ErrorCode are enums; their value is the label, not their repr.
    if isinstance(value, Enum):
        return str(value.value)
    return "" if value is None else str(value)


class ServingMetrics:
    """The ``modelloop_*`` serving metrics of DESIGN.md.

    Args:
        registry: Where the metrics are registered. Use a fresh one per server.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.statistics = InferenceStatistics()
        """The same observations, as the exact per-version sums of the statistics extension."""
        self.requests = Counter(
            "modelloop_requests",
            "Inference requests by model, version, protocol and outcome code (OK or an error code).",
            ["model", "version", "protocol", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "modelloop_request_duration_seconds",
            "Time from a decoded request to its response, in seconds.",
            ["model", "version", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "modelloop_batch_size",
            "Rows per runtime call after dynamic batching.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "modelloop_queue_duration_seconds",
            "Time a request waited in the batch queue before its batch ran, in seconds.",
            ["model", "version"],
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self.versions_loaded = Gauge(
            "modelloop_model_versions_loaded",
            "Versions of a model that are AVAILABLE.",
            ["model"],
            registry=registry,
            # With several workers: what the worker with the most reports (they converge).
            multiprocess_mode="livemax",
        )
        # Children by label values: ``.labels()`` validates and joins its labels under a lock
        # on every call; a dict hit per request is a fraction of that. Label sets are bounded
        # (known models only), so the caches are too.
        self._request_children: dict[tuple[str, object, object, object], tuple[Any, Any, bool]] = {}
        self._batch_children: dict[tuple[str, int], Any] = {}
        self._queue_children: dict[tuple[str, int], Any] = {}
        self.load_failures = Counter(
            "modelloop_model_load_failures",
            "Version loads that failed (the version is marked FAILED).",
            ["model"],
            registry=registry,
        )
        self.model_loads = Counter(
            "modelloop_model_loads",
            "Versions loaded on a request (--max-loaded-models), successful or not.",
            ["model"],
            registry=registry,
        )
        self.model_evictions = Counter(
            "modelloop_model_evictions",
            "Idle versions unloaded to make room for another (--max-loaded-models).",
            ["model"],
            registry=registry,
        )
        self.cold_load_duration = Histogram(
            "modelloop_model_cold_load_seconds",
            "Time from a request for a version not in memory to the version loaded, in seconds.",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.repository_errors = Counter(
            "modelloop_repository_errors",
            "Polls of a remote model repository that failed (unreachable, denied, missing bucket).",
            registry=registry,
        )

    def observe_request(
        self, model: str, version: int | str | None, protocol: object, code: object, seconds: float
    ) -> None:
        """Counts one request and records its duration.

        Args:
            model: Model name as requested.
            version: The version that answered; None or "" when none was resolved.
            protocol: A :class:`~modelloop.serving.types.Protocol` or its value.
            code: ``"OK"``, an :class:`~modelloop.serving.errors.ErrorCode` or its value.
            seconds: Duration in seconds.
        """
        # The children are bound once per label set and found again by the arguments as
        # given (enums and ints hash without being turned into label text per call).
        children = self._request_children.get((model, version, protocol, code))
        if children is None:
            m, v, p, c = model, _label(version), _label(protocol), _label(code)
            children = (self.requests.labels(m, v, p, c), self.request_duration.labels(m, v, p), c == "OK")
            self._request_children[(model, version, protocol, code)] = children
        children[0].inc()
        children[1].observe(seconds)
        if model and isinstance(version, int):
            self.statistics.record_request(model, version, ok=children[2], seconds=seconds)

    def observe_batch(self, model: str, version: int, rows: int) -> None:
        """Records the row count of one runtime call."""
        child = self._batch_children.get((model, version))
        if child is None:
            child = self._batch_children[(model, version)] = self.batch_size.labels(model, str(version))
        child.observe(rows)

    def observe_queue(self, model: str, version: int, seconds: float) -> None:
        """Records how long one request waited before its batch ran."""
        child = self._queue_children.get((model, version))
        if child is None:
            child = self._queue_children[(model, version)] = self.queue_duration.labels(model, str(version))
        child.observe(seconds)
        self.statistics.record_queue(model, version, seconds)

    def observe_execution(self, model: str, version: int, rows: int, seconds: float, *, ok: bool) -> None:
        """Records one runtime call: its rows, its wall time and whether it returned outputs.

        Called from the batcher's threads; only the statistics extension keeps these.
        """
        self.statistics.record_execution(model, version, rows=rows, seconds=seconds, ok=ok)

    def set_versions_loaded(self, model: str, count: int) -> None:
        """Sets the number of AVAILABLE versions of ``model``."""
        self.versions_loaded.labels(model).set(count)

    def observe_cold_load(self, model: str, seconds: float) -> None:
        """Counts one load on request and its latency (waiting for room included)."""
        self.model_loads.labels(model).inc()
        self.cold_load_duration.labels(model).observe(seconds)

    def count_eviction(self, model: str) -> None:
        """Counts one version of ``model`` unloaded to make room."""
        self.model_evictions.labels(model).inc()

    def count_repository_error(self) -> None:
        """Counts one failed read of a remote repository."""
        self.repository_errors.inc()

    def count_load_failure(self, model: str) -> None:
        """Counts one failed version load of ``model``."""
        self.load_failures.labels(model).inc()


def write_worker_pool_state(
    directory: Path, configured: int, running: int, restarts: Mapping[str, int]
) -> None:
    """Writes the worker pool's state for :class:`WorkerPoolCollector` (atomically: a rename).

    Args:
        directory: The multiprocess metrics directory.
        configured: Workers the server runs.
        running: Workers ready now.
        restarts: Restarts so far, by worker index.
    """
    path = Path(directory) / WORKER_POOL_FILE
    staged = path.with_suffix(f".{os.getpid()}.tmp")
    staged.write_text(json.dumps({"configured": configured, "running": running, "restarts": dict(restarts)}))
    staged.replace(path)


class WorkerPoolCollector:
    """``modelloop_workers`` and ``modelloop_worker_restarts_total`` from the supervisor's file.

    Registered on the registry ``/metrics`` exposes when the server runs several workers.

    Args:
        directory: The multiprocess metrics directory.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / WORKER_POOL_FILE

    def collect(self) -> Iterator[Metric]:
        """The two metric families (nothing while the file is missing or being replaced)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        workers = GaugeMetricFamily(
            "modelloop_workers", "Server worker processes, by state.", labels=["state"]
        )
        workers.add_metric(["configured"], float(state.get("configured", 0)))
        workers.add_metric(["running"], float(state.get("running", 0)))
        yield workers
        restarts = CounterMetricFamily(
            "modelloop_worker_restarts", "Worker processes restarted after they died.", labels=["worker"]
        )
        for index, count in sorted(state.get("restarts", {}).items()):
            restarts.add_metric([str(index)], float(count))
        yield restarts


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """The registry ``/metrics`` exposes with several workers: every worker's metrics, summed.

    Args:
        directory: The multiprocess metrics directory (``PROMETHEUS_MULTIPROC_DIR``).

    Returns:
        A registry with prometheus_client's multiprocess collector and the pool's state.
    """
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(directory))
    registry.register(WorkerPoolCollector(directory))  # type: ignore[arg-type]
    return registry
