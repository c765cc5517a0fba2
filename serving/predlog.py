"""The prediction logger: what serving hands to the prediction log, and the log's record format.

The serving process answers; whatever watches its answers (drift, accuracy, the label-free
estimate, rollout judging, retraining) reads the prediction log elsewhere, in the control
plane (``modelloop monitor``, see ARCHITECTURE.md). This module is serving's whole part:

- :meth:`PredictionLogger.observe` runs on the request path, once per answered request. It
  takes a per-model sample (``"log_sample"`` in ``config.json``), appends a reference to the
  request's tensors to a bounded buffer and returns: no conversion, no lock, no I/O. A full
  buffer drops the request and counts it (``modelloop_monitoring_dropped_total``).
- One writer thread wakes every ``flush_interval_s`` and encodes everything buffered: one
  record batch per model version, one row per predicted row (:data:`LOG_SCHEMA`), built with
  one concatenation per column for the whole batch (:func:`encode_batch`). The batches make
  one segment, an Arrow IPC stream (with ``segment_s``, the batches of a few seconds, for an
  object log that wants fewer, bigger objects). The segment goes to the sink
  (:class:`PredictionLogSink`: a SQL table, or objects in a bucket). A sink that fails keeps
  the segments in memory up to ``max_pending_segments`` and retries; past that bound the
  oldest are dropped, counted, and logged once per interval. Nothing blocks a request.

The format is plain Arrow, so pandas, DuckDB and Spark read the log as it is; ``modelloop
log export`` writes it as Parquet.

Example:

```python
logger = PredictionLogger(sink, columns=lambda m, v: LogColumns("pixels", "probabilities"))
logger.start()
dataplane = DataPlane(registry, metrics, observer=logger)
...
logger.flush()  # every request observed so far is in the sink
logger.stop()
```
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import operator
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from modelloop import layout
from modelloop.errors import ServiceError
from modelloop.logformat import (  # noqa: F401 - the format, re-exported for serving's callers
    LOG_FORMAT,
    LOG_SCHEMA,
    LogColumns,
    decode_segment,
    encode_batch,
    encode_segment,
    input_digest,
)
from modelloop.serving import tracing
from modelloop.serving.types import InferRequest, InferResponse

logger = logging.getLogger(__name__)

# Seconds between two "sink unavailable" warnings.
_WARN_EVERY_S = 30.0
# Seconds a model's log_sample is cached before it is read again.
_SAMPLE_TTL_S = 5.0


def repository_columns(repo: Path) -> Callable[[str, int], LogColumns]:
    """Which tensors to log, read from a version's files: the input its baseline describes
    (``baseline.json``'s ``"input"``) and the first output of its ``model.json``.

    Args:
        repo: The model repository root.

    Returns:
        ``(model, version) -> LogColumns``; unreadable files give the defaults.
    """

    def columns(model: str, version: int) -> LogColumns:
        version_dir = repo / model / str(version)
        output: str | None = None
        with contextlib.suppress(layout.LayoutError, OSError):
            output = layout.read_model_card(version_dir).outputs[0].name
        field: str | None = None
        with contextlib.suppress(OSError, ValueError):
            baseline = json.loads((version_dir / layout.BASELINE_FILE).read_text(encoding="utf-8"))
            value = baseline.get("input") if isinstance(baseline, dict) else None
            field = value if isinstance(value, str) else None
        return LogColumns(field, output)

    return columns


_version_key = operator.itemgetter(0, 1)


class PredictionLogSink(Protocol):
    """Where segments go: :class:`~modelloop.monitoring.predlog_store.SqlPredictionLog` or object storage."""

    def append(self, segment: bytes, *, rows: int) -> None:
        """Stores one segment durably, or raises (the logger keeps it and retries).

        Args:
            segment: An Arrow IPC stream of :data:`LOG_SCHEMA` record batches.
            rows: The rows it holds.
        """
        ...


class PredictionLogger:
    """Hands answered requests to the prediction log, off the request path.

    Args:
        sink: Where segments go.
        columns: ``(model, version) -> LogColumns``; called by the writer thread and
            cached per version. Defaults to the first input and first numeric output.
        sample: ``model -> share of requests to log`` (``"log_sample"``); cached a few
            seconds per model. Defaults to logging every request.
        on_drop: Called with ``(model, requests)`` for requests that will never be
            logged. Defaults to None.
        queue_size: Requests buffered before new ones are dropped. Defaults to 100000.
        flush_interval_s: How often the writer turns the buffer into a segment.
            Defaults to 0.25.
        max_pending_segments: Segments kept while the sink fails. Defaults to 64.
        segment_s: Seconds of traffic one segment may gather over several flushes (an
            object log wants a few seconds per object); an explicit :meth:`flush` and
            :meth:`stop` end the segment at once. Defaults to None: one segment per flush.
        segment_bytes: With ``segment_s``, a segment also ends once its encoded batches
            hold this many bytes. Defaults to 8 MiB.
    """

    def __init__(
        self,
        sink: PredictionLogSink,
        *,
        columns: Callable[[str, int], LogColumns] | None = None,
        sample: Callable[[str], float] | None = None,
        on_drop: Callable[[str, int], None] | None = None,
        queue_size: int = 100_000,
        flush_interval_s: float = 0.25,
        max_pending_segments: int = 64,
        segment_s: float | None = None,
        segment_bytes: int = 8 << 20,
    ) -> None:
        self.sink = sink
        self._columns = columns
        self._sample = sample
        self._on_drop = on_drop
        self.queue_size = queue_size
        self.flush_interval_s = flush_interval_s
        self.max_pending_segments = max_pending_segments
        self.segment_s = segment_s
        self.segment_bytes = segment_bytes
        # The segment being gathered: its batches, requests, requests per model, bytes, start.
        self._open: list[pa.RecordBatch] = []
        self._open_count = 0
        self._open_models: collections.Counter[str] = collections.Counter()
        self._open_bytes = 0
        self._open_since = 0.0
        self._flush_asked = False
        self._buffer: collections.deque[tuple[Any, ...]] = collections.deque()
        self._pending: collections.deque[tuple[bytes, int, dict[str, int]]] = collections.deque()
        self._column_cache: dict[tuple[str, int], LogColumns] = {}
        self._rates: dict[str, float] = {}
        self._rates_read = time.monotonic()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Requests taken from the buffer by the writer, and of those, in the sink or dropped.
        self._taken = 0
        self._written = 0
        self._last_warning = 0.0
        self.dropped = 0
        self.segments = 0

    # -- the request path ----------------------------------------------------------

    def observe(self, request: InferRequest, response: InferResponse) -> None:
        """Buffers one answered request; never blocks and never raises.

        A few dictionary and deque operations: the sample rate comes from a dictionary the
        writer thread empties every few seconds (so ``log_sample`` is read again), and the
        tensors are kept by reference, for the writer to encode.
        """
        model = response.model
        if self._sample is not None:
            rate = self._rates.get(model)
            if rate is None:
                rate = self._rate(model)
            if rate < 1.0 and random.random() >= rate:
                return
        buffer = self._buffer
        if len(buffer) >= self.queue_size:
            self._drop(model, 1)
            return
        buffer.append(
            (
                model,
                response.version,
                response.id,
                time.time(),
                response.seconds,
                request.inputs,
                response.outputs,
                request.trace,
            )
        )

    def _rate(self, model: str) -> float:
        try:
            rate = float(self._sample(model)) if self._sample is not None else 1.0
        except (ServiceError, LookupError, ValueError, TypeError):  # a vanished model: log everything
            rate = 1.0
        self._rates[model] = rate
        return rate

    def _drop(self, model: str, count: int) -> None:
        self.dropped += count
        if self._on_drop is not None:
            try:
                self._on_drop(model, count)
            except Exception:  # counting must never fail the caller
                logger.exception("counting dropped predictions failed")

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Starts the writer thread (once)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="prediction-logger", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Writes what is buffered, then stops the writer thread.

        Args:
            timeout: Most seconds to wait. Defaults to 10.
        """
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "prediction logger still writing at shutdown; %d requests not logged", self.pending
            )
        self._thread = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits until every request observed before this call is in the sink.

        Returns:
            Whether it was, in time (False while the sink fails).
        """
        with self._progress:
            target = self._taken + len(self._buffer)
        deadline = time.monotonic() + timeout
        self._flush_asked = True
        self._wake.set()
        with self._progress:
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._progress.wait(min(left, self.flush_interval_s))
                self._flush_asked = True
                self._wake.set()
        return True

    @property
    def pending(self) -> int:
        """Requests not yet in the sink."""
        return len(self._buffer) + self._open_count + sum(n for _, n, _ in self._pending)

    # -- the writer ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._write_once(final=stopping)
            except Exception:  # the writer must outlive any bad request or bug
                logger.exception("prediction logger failed on a segment")
            if stopping:
                return

    def _write_once(self, final: bool = False) -> None:
        now = time.monotonic()
        if now - self._rates_read >= _SAMPLE_TTL_S:
            self._rates_read = now
            self._rates = {}  # observe reads each model's log_sample again
        asked, self._flush_asked = self._flush_asked, False
        buffer = self._buffer
        with self._progress:  # flush() reads taken + buffered under the same lock
            taken = [buffer.popleft() for _ in range(len(buffer))]
            self._taken += len(taken)
        span = None
        if taken and tracing.TRACER is not None:
            traced = [item[7] for item in taken if item[7] is not None]
            if traced:
                models = sorted({(item[0], item[1]) for item in taken})
                span = tracing.start_log_write(traced, len(taken), models)
        try:
            if taken:
                if not self._open_count:
                    self._open_since = now
                self._gather(taken)
            if self._open_count and (final or asked or self._segment_full(now)):
                self._close_segment()
            self._append_pending()
        finally:
            if span is not None:
                span.end()

    def _segment_full(self, now: float) -> bool:
        if self.segment_s is None:
            return True
        return now - self._open_since >= self.segment_s or self._open_bytes >= self.segment_bytes

    def _close_segment(self) -> None:
        batches, count, models = self._open, self._open_count, dict(self._open_models)
        self._open, self._open_count, self._open_bytes = [], 0, 0
        self._open_models = collections.Counter()
        self._pending.append(((encode_segment(batches) if batches else b""), count, models))
        while len(self._pending) > self.max_pending_segments:
            _, dropped, models_dropped = self._pending.popleft()
            for model, n in models_dropped.items():
                self._drop(model, n)
            self._mark_written(dropped)

    def _append_pending(self) -> None:
        while self._pending:
            segment, count, _ = self._pending[0]
            if segment:
                try:
                    self.sink.append(segment, rows=count)
                except (ServiceError, OSError) as exc:  # the sink is down: keep it, try again later
                    now = time.monotonic()
                    if now - self._last_warning >= _WARN_EVERY_S:
                        self._last_warning = now
                        logger.warning(
                            "prediction log unavailable, %d requests waiting: %s", self.pending, exc
                        )
                    return
                self.segments += 1
            self._pending.popleft()
            self._mark_written(count)

    def _mark_written(self, count: int) -> None:
        with self._progress:
            self._written += count
            self._progress.notify_all()

    def _gather(self, items: list[tuple[Any, ...]]) -> None:
        """Encodes requests into record batches of the open segment (one per model version)."""
        groups: dict[tuple[str, int], list[tuple[Any, ...]]]
        first, last = items[0], items[-1]
        keys = set(map(_version_key, items)) if (first[0], first[1]) == (last[0], last[1]) else None
        if keys is not None and len(keys) == 1:  # one model version: the usual case
            groups = {(first[0], first[1]): items}
        else:
            groups = {}
            for item in items:
                groups.setdefault((item[0], item[1]), []).append(item)
        self._open_count += len(items)
        for (model, version), members in groups.items():
            self._open_models[model] += len(members)
            try:
                batch = encode_batch(members, self._columns_of(model, version))
            except Exception:
                logger.exception(
                    "cannot log %d requests of model %s version %s", len(members), model, version
                )
                continue
            if batch is not None:
                self._open.append(batch)
                self._open_bytes += batch.nbytes

    def _columns_of(self, model: str, version: int) -> LogColumns:
        key = (model, version)
        found = self._column_cache.get(key)
        if found is None:
            found = LogColumns()
            if self._columns is not None:
                try:
                    found = self._columns(model, version)
                except Exception:  # unreadable card or baseline: the defaults still log
                    logger.exception("model %s version %d: cannot tell which columns to log", model, version)
            self._column_cache[key] = found
        return found
