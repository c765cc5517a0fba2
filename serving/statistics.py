"""Per-version inference statistics: the figures of Triton's statistics extension.

:class:`InferenceStatistics` is fed by the same calls that feed the Prometheus metrics
(:class:`~modelloop.serving.metrics.ServingMetrics` ``observe_request``,
``observe_queue`` and ``observe_execution``), with the same measured durations: one
measurement, kept as exact per-version sums that Triton's schema needs (success and
failure durations apart, batch sizes exact) and that Prometheus' histograms cannot give
back. ``GET /v2/models[/{m}[/versions/{v}]]/stats`` and the gRPC ``ModelStatistics``
call read :meth:`InferenceStatistics.snapshot`.

What the figures mean, in Triton's words:

- ``inference_count``: rows inferred (a batch of 8 rows counts 8), ``execution_count``:
  runtime calls (one per batch), ``last_inference``: when the latest request ended, in
  milliseconds since the epoch (0 before the first one).
- ``success`` / ``fail``: requests and their whole duration in the server, from the decoded
  target to the answer.
- ``queue``: time the requests waited in the batcher's queue.
- ``compute_infer``: the runtime calls and their wall time; ``batch_stats`` the same per
  batch size.
- ``compute_input`` / ``compute_output``: the runtimes take and return NumPy arrays as
  they are, so there is no separate copy in or out to time: their count is the executions'
  and their time 0 (the copies are inside ``compute_infer``).

Example:

```python
statistics = InferenceStatistics()
statistics.record_execution("digits", 1, rows=8, seconds=0.0004)
statistics.record_request("digits", 1, ok=True, seconds=0.0011)
statistics.snapshot("digits", 1).inference_count  # 8
```
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(slots=True)
class Duration:
    """A count of events and their total duration in nanoseconds (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        """Adds ``count`` events that took ``seconds`` together."""
        self.count += count
        self.ns += max(0, round(seconds * 1e9))


@dataclass(slots=True)
class BatchStatistics:
    """The runtime calls of one batch size (Triton's ``InferBatchStatistics``)."""

    batch_size: int
    compute_infer: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStatistics:
    """Everything counted for one model version since the server started.

    Attributes:
        name: Model name.
        version: Version number.
        last_inference: When the latest request ended, ms since the epoch; 0 before any.
        inference_count: Rows inferred successfully.
        execution_count: Runtime calls.
        success: Answered requests and their time in the server.
        fail: Refused or failed requests (once a version was resolved) and their time.
        queue: Time requests waited for their batch.
        compute_infer: Runtime calls and their wall time.
        batches: Runtime calls by batch size.
    """

    name: str
    version: int
    last_inference: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStatistics] = field(default_factory=dict)

    def copy(self) -> VersionStatistics:
        """A deep copy, for readers outside the lock."""
        return replace(
            self,
            success=replace(self.success),
            fail=replace(self.fail),
            queue=replace(self.queue),
            compute_infer=replace(self.compute_infer),
            batches={
                size: BatchStatistics(size, replace(b.compute_infer)) for size, b in self.batches.items()
            },
        )

    def as_dict(self) -> dict[str, Any]:
        """One entry of ``model_stats`` in Triton's schema (gRPC's message has the same fields)."""
        executions = {"count": self.execution_count, "ns": 0}
        return {
            "name": self.name,
            "version": str(self.version),
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration_json(self.success),
                "fail": _duration_json(self.fail),
                "queue": _duration_json(self.queue),
                "compute_input": dict(executions),
                "compute_infer": _duration_json(self.compute_infer),
                "compute_output": dict(executions),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": b.compute_infer.count, "ns": 0},
                    "compute_infer": _duration_json(b.compute_infer),
                    "compute_output": {"count": b.compute_infer.count, "ns": 0},
                }
                for size, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


def _duration_json(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


class InferenceStatistics:
    """Per-version sums of what the server measures, safe to feed from the batch threads.

    Executions are recorded on the batcher's threads and requests on the event loop, so
    every update takes one lock (held for a few dict and integer operations).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], VersionStatistics] = {}

    def _entry(self, model: str, version: int) -> VersionStatistics:
        key = (model, version)
        entry = self._versions.get(key)
        if entry is None:
            entry = self._versions[key] = VersionStatistics(model, version)
        return entry

    def record_request(self, model: str, version: int, *, ok: bool, seconds: float) -> None:
        """Counts one request that reached a version, answered (``ok``) or not."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            entry = self._entry(model, version)
            (entry.success if ok else entry.fail).add(seconds)
            entry.last_inference = now_ms

    def record_queue(self, model: str, version: int, seconds: float) -> None:
        """Adds one request's wait for its batch."""
        with self._lock:
            self._entry(model, version).queue.add(seconds)

    def record_execution(self, model: str, version: int, *, rows: int, seconds: float, ok: bool) -> None:
        """Counts one runtime call of ``rows`` rows; only a successful call's rows are inferences."""
        with self._lock:
            entry = self._entry(model, version)
            entry.execution_count += 1
            entry.compute_infer.add(seconds)
            if ok:
                entry.inference_count += rows
            batch = entry.batches.get(rows)
            if batch is None:
                batch = entry.batches[rows] = BatchStatistics(rows)
            batch.compute_infer.add(seconds)

    def snapshot(self, model: str, version: int) -> VersionStatistics:
        """A copy of one version's figures (all zero when nothing was recorded)."""
        with self._lock:
            entry = self._versions.get((model, version))
            return entry.copy() if entry is not None else VersionStatistics(model, version)

    def versions(self, model: str) -> list[int]:
        """The versions of ``model`` with recorded figures, ascending."""
        with self._lock:
            return sorted(v for (m, v) in self._versions if m == model)
