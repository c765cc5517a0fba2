"""The inference observer that feeds monitoring, off the request path.

:meth:`MonitoringObserver.observe` runs on the event loop inside every successful
inference. It only appends a reference to the request's tensors to a bounded buffer (a
``deque`` append, atomic under the GIL: no lock, well under a microsecond) and, when the
buffer is full, drops the request and counts it in ``modelloop_monitoring_dropped_total``.
It never waits. It wakes the worker only when the buffer was empty.

One worker thread lingers ``linger_s`` after the first request of a batch, then takes the
batch, converts it per model version with a few array operations (stacking the rows of
every request, not one request at a time), writes it to the store in one transaction, and
appends the input rows to the drift windows. Between batches it holds the GIL only for
bounded stretches (the store's driver releases it while SQLite works), so it cannot starve
the event loop. Store errors are logged and counted as dropped; the windows are still
filled, so drift keeps working while the database is down.

With tracing on, each written batch is a span (``modelloop.monitoring.write``) linked to
the spans of the requests it records (:func:`write_span`).

Example:

```python
observer = MonitoringObserver(store, windows, metrics, describe=service.version_info)
observer.start()
dataplane = DataPlane(registry, serving_metrics, observer=observer)
...
observer.flush(timeout=2)  # everything observed so far is in the store
observer.stop()
```
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.logformat import input_digest
from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.stores.engine import StoreUnavailable
from modelloop.monitoring.stores.predictions import PredictionWriter
from modelloop.monitoring.stores.records import PredictionRecord
from modelloop.monitoring.window import WindowSet
from modelloop.serving.types import InferRequest, InferResponse

logger = logging.getLogger(__name__)

# Seconds an idle worker sleeps before it looks at the buffer again without being woken.
_IDLE_S = 1.0
# Seconds between two "store unavailable" log lines, so a long outage does not flood the log.
_WARN_EVERY_S = 30.0


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """How to read the requests of one model version.

    Attributes:
        task: ``multiclass``, ``binary`` or ``regression``.
        classes: Number of classes (0 for regressors).
        input_name: The input the baseline describes; None = the request's first input.
        output_name: The output predictions come from; None = the response's first output.
    """

    task: str = "multiclass"
    classes: int = 0
    input_name: str | None = None
    output_name: str | None = None


def predicted_values(outputs: np.ndarray, task: str) -> np.ndarray:
    """Predicted class ids (classifiers) or values (regressors) of ``[n, k]`` outputs.

    A binary classifier with one output column is thresholded at 0.5; with several
    columns (and for multiclass) the class is the argmax.
    """
    if task == "regression":
        return outputs[:, 0].astype(np.float64)
    if outputs.shape[1] == 1:
        return (outputs[:, 0] >= 0.5).astype(np.int64)
    return outputs.argmax(axis=1).astype(np.int64)


def write_span(batch: list[Any], traced: list[Any]) -> Any:
    """Starts the span of one written batch: linked to every traced request in it.

    Its parent is the first traced (and sampled) request's span, so that a lone request's
    trace shows its write; tracing is on when requests carry a span context (``InferRequest.trace``),
    and the span goes to the process's tracer provider, which the server set up.

    Args:
        batch: The buffer items being written.
        traced: The span contexts the items carry, in order.

    Returns:
        The started span (``modelloop.monitoring.write``).
    """
    from opentelemetry import trace

    # The first sampled request is the parent (a ratio sampler keeps the span for it).
    parent = next((c for c in traced if c.trace_flags.sampled), traced[0])
    models = {(item[0], item[1]) for item in batch}
    attributes: dict[str, str | int] = {"modelloop.monitoring.requests": len(batch)}
    if len(models) == 1:
        model, version = next(iter(models))
        attributes["modelloop.model"] = model
        attributes["modelloop.version"] = version
    return trace.get_tracer("modelloop.monitoring").start_span(
        "modelloop.monitoring.write",
        context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
        links=[trace.Link(context) for context in traced],
        attributes=attributes,
    )


class MonitoringObserver:
    """Logs answered requests to the store and the drift windows, in the background.

    Args:
        store: Where predictions are logged.
        windows: The drift windows to fill.
        metrics: Where drops are counted.
        describe: ``(model, version) -> VersionInfo`` (cached by the caller).
        queue_size: Requests waiting (the buffer's bound) before new ones are dropped.
            Defaults to 10000.
        sample_features: Input columns logged per row. Defaults to 64.
        batch_size: Most requests written in one transaction. Defaults to 256.
        linger_s: How long the worker keeps collecting after the first request of a
            batch. Defaults to 0.05.
    """

    def __init__(
        self,
        store: PredictionWriter,
        windows: WindowSet,
        metrics: MonitoringMetrics,
        describe: Callable[[str, int], VersionInfo],
        *,
        queue_size: int = 10_000,
        sample_features: int = 64,
        batch_size: int = 256,
        linger_s: float = 0.05,
    ) -> None:
        self.store = store
        self.windows = windows
        self.metrics = metrics
        self.describe = describe
        self.sample_features = sample_features
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.queue_size = queue_size
        self._buffer: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._hurry = False  # a flush or stop wants the batch now, without lingering
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._progress = threading.Condition()
        self._enqueued = 0
        self._processed = 0
        self.dropped = 0
        self._last_warning = 0.0

    # -- the request path ----------------------------------------------------------

    def observe(self, request: InferRequest, response: InferResponse) -> None:
        """Queues one answered request; drops and counts it when the queue is full.

        Never blocks and never raises.
        """
        buffer = self._buffer
        if len(buffer) >= self.queue_size:
            self.dropped += 1
            self.metrics.dropped.labels(model=response.model).inc()
            return
        buffer.append(
            (
                response.model,
                response.version,
                response.id,
                time.time(),
                request.inputs,
                response.outputs,
                request.trace,
            )
        )
        # A plain int: the GIL makes += atomic enough for a progress mark read under the lock.
        self._enqueued += 1
        if len(buffer) == 1:
            # The first of a batch wakes the worker; the rest find it lingering. (If the
            # worker took the item in between, it is processed either way.)
            self._wake.set()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="monitoring-observer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Writes what is queued, then stops the worker thread.

        Args:
            timeout: Most seconds to wait for the queue to drain. Defaults to 10.
        """
        if self._thread is None:
            return
        self._stopping = self._hurry = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "monitoring observer still writing at shutdown; %d requests not logged", self.pending
            )
        self._thread = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits until every request observed before this call is processed.

        The feedback route calls it first, so a label posted right after its prediction
        finds the prediction logged.

        Args:
            timeout: Most seconds to wait. Defaults to 5.

        Returns:
            Whether everything was processed in time.
        """
        target = self._enqueued
        deadline = time.monotonic() + timeout
        if self._processed < target:
            self._hurry = True
            self._wake.set()
        with self._progress:
            while self._processed < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._progress.wait(left)
        return True

    @property
    def pending(self) -> int:
        """Requests waiting in the buffer."""
        return len(self._buffer)

    # -- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        buffer = self._buffer
        while True:
            self._wake.wait(_IDLE_S)
            self._wake.clear()
            if buffer and not self._hurry:
                # Linger a little: under load this turns thousands of tiny fsynced commits a
                # second into a few large ones, and the worker stops competing with the
                # event loop for the GIL on every request. A flush or stop cuts it short.
                deadline = time.monotonic() + self.linger_s
                while len(buffer) < self.batch_size and not self._hurry:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                    self._wake.clear()
            self._hurry = False
            while buffer:
                batch = [buffer.popleft() for _ in range(min(self.batch_size, len(buffer)))]
                traced = [item[6] for item in batch if item[6] is not None]
                span = write_span(batch, traced) if traced else None
                try:
                    self._process(batch)
                except Exception as exc:  # the worker must outlive any bad request or bug
                    logger.exception("monitoring observer failed on a batch of %d requests", len(batch))
                    if span is not None:
                        span.record_exception(exc)
                finally:
                    if span is not None:
                        span.end()
                with self._progress:
                    self._processed += len(batch)
                    self._progress.notify_all()
                # Hand the GIL back between batches: a backlog is written in stretches of at
                # most batch_size requests, never in one long hold the event loop waits behind.
                time.sleep(0)
            if self._stopping:
                return

    def write(self, batch: list[Any]) -> int:
        """Stores a batch of answered requests, then adds their rows to the drift windows.

        The control plane's path (:class:`~modelloop.monitoring.ingest.LogIngest`): the
        windows take the rows only once the store has them, so a batch that is retried
        after an outage is not counted twice.

        Args:
            batch: ``(model, version, request_id, time, inputs, outputs, trace[, digest])``
                tuples.

        Returns:
            Requests stored.

        Raises:
            StoreUnavailable: The store cannot be written; nothing was added.
        """
        records, windows = self._convert_all(batch)
        if records:
            self.store.record(records)
        for model, version, rows, predicted, out in windows:
            self.windows.add(model, version, rows, predicted, out)
        return len(records)

    def _convert_all(self, batch: list[Any]) -> tuple[list[PredictionRecord], list[tuple[Any, ...]]]:
        # One conversion per model version and batch, not per request: the rows of every
        # request of a version are stacked, cast and scored with a few array operations,
        # and the drift window takes them in one call.
        groups: dict[tuple[str, int], list[Any]] = {}
        for item in batch:
            groups.setdefault((item[0], item[1]), []).append(item)
        records: list[PredictionRecord] = []
        windows: list[tuple[Any, ...]] = []
        for (model, version), items in groups.items():
            try:
                records.extend(self._convert(model, version, items, windows))
            except Exception:
                logger.exception("cannot log %d requests of model %s version %s", len(items), model, version)
        return records, windows

    def _process(self, batch: list[Any]) -> None:
        records, windows = self._convert_all(batch)
        # The direct path fills the windows whatever the store does: drift keeps working
        # while the database is down.
        for model, version, rows, predicted, out in windows:
            self.windows.add(model, version, rows, predicted, out)
        if not records:
            return
        try:
            self.store.record(records)
        except StoreUnavailable as exc:
            for model, count in Counter(r.model for r in records).items():
                self.metrics.dropped.labels(model=model).inc(count)
            self.dropped += len(records)
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY_S:
                self._last_warning = now
                logger.warning("prediction log unavailable, %d requests not logged: %s", len(records), exc)

    def _convert(
        self, model: str, version: int, items: list[Any], windows: list[tuple[Any, ...]]
    ) -> list[PredictionRecord]:
        info = self.describe(model, version)
        picked: list[tuple[str, float, np.ndarray, np.ndarray, str]] = []
        for item in items:
            rid, created, inputs, outputs = item[2], item[3], item[4], item[5]
            x = inputs.get(info.input_name) if info.input_name else None
            if x is None:
                x = next(iter(inputs.values()), None)
            y = outputs.get(info.output_name) if info.output_name else None
            if y is None:
                y = next(iter(outputs.values()), None)
            if x is None or y is None:
                continue
            x, y = np.asarray(x), np.asarray(y)
            n = x.shape[0] if x.ndim else 1
            if y.dtype.kind not in "iufb" or (y.shape[0] if y.ndim else 1) != n:
                continue  # string outputs: no prediction to log
            # String inputs (BYTES) have no features to bin: the prediction is logged with
            # no input columns, so accuracy, prediction drift and the estimate still work.
            rows = x.reshape(n, -1) if x.dtype.kind in "iufb" else np.zeros((n, 0))
            digest = item[7] if len(item) > 7 else input_digest(x)
            picked.append((rid, created, rows, y.reshape(n, -1), digest))
        if not picked:
            return []
        widths = {(x.shape[1], y.shape[1]) for _, _, x, y, _ in picked}
        if len(widths) > 1:
            # Variable-width inputs: the rows cannot share one array; convert each alone.
            records: list[PredictionRecord] = []
            for one in picked:
                records.extend(self._records(model, version, info, [one], windows))
            return records
        return self._records(model, version, info, picked, windows)

    def _records(
        self,
        model: str,
        version: int,
        info: VersionInfo,
        picked: list[tuple[str, float, np.ndarray, np.ndarray, str]],
        windows: list[tuple[Any, ...]],
    ) -> list[PredictionRecord]:
        rows = np.concatenate([x for _, _, x, _, _ in picked]).astype(np.float64)
        out = np.concatenate([y for _, _, _, y, _ in picked]).astype(np.float64)
        predicted = predicted_values(out, info.task) if out.shape[1] else None
        windows.append((model, version, rows, predicted, out))
        # Contiguous, so that each record's slice serialises as an array (orjson needs C order).
        sample = np.ascontiguousarray(rows[:, : self.sample_features])
        empty = np.zeros(0, dtype=np.int64)
        records = []
        start = 0
        for rid, created, x, _, digest in picked:
            end = start + x.shape[0]
            records.append(
                PredictionRecord(
                    request_id=rid,
                    model=model,
                    version=version,
                    created=created,
                    inputs=sample[start:end],
                    outputs=out[start:end],
                    predicted=empty if predicted is None else predicted[start:end],
                    task=info.task,
                    classes=info.classes,
                    input_hash=digest,
                )
            )
            start = end
        return records
