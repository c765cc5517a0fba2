"""The inference observer that feeds monitoring, off the request path.

:meth:`MonitoringObserver.observe` runs on the event loop inside every successful
inference. It only puts a reference to the request's tensors on a bounded
``queue.Queue`` (``put_nowait``: a lock and an append) and, when the queue is full, drops
the request and counts it in ``modelloop_monitoring_dropped_total``. It never waits.

One worker thread takes batches off the queue, turns them into
:class:`~modelloop.monitoring.store.PredictionRecord` rows, writes them to the store in
one transaction, and appends the full input rows to the drift windows. Store errors are
logged and counted as dropped; the windows are still filled, so drift keeps working while
the database is down.

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

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.store import PredictionRecord, PredictionStore, StoreUnavailable
from modelloop.monitoring.window import WindowSet
from modelloop.serving.types import InferRequest, InferResponse

logger = logging.getLogger(__name__)

_STOP = object()
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


class MonitoringObserver:
    """Logs answered requests to the store and the drift windows, in the background.

    Args:
        store: Where predictions are logged.
        windows: The drift windows to fill.
        metrics: Where drops are counted.
        describe: ``(model, version) -> VersionInfo`` (cached by the caller).
        queue_size: Requests waiting before new ones are dropped. Defaults to 10000.
        sample_features: Input columns logged per row. Defaults to 64.
        batch_size: Most requests written in one transaction. Defaults to 256.
        linger_s: How long the worker keeps collecting after the first request of a
            batch. Defaults to 0.05.
    """

    def __init__(
        self,
        store: PredictionStore,
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
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
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
        item = (response.model, response.version, response.id, time.time(), request.inputs, response.outputs)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self.metrics.dropped.labels(model=response.model).inc()
            return
        # A plain int: the GIL makes += atomic enough for a progress mark read under the lock.
        self._enqueued += 1

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
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            logger.warning(
                "monitoring queue still full at shutdown; %d requests not logged", self._queue.qsize()
            )
        self._thread.join(timeout)
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
        with self._progress:
            while self._processed < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._progress.wait(left)
        return True

    @property
    def pending(self) -> int:
        """Requests waiting in the queue."""
        return self._queue.qsize()

    # -- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            # Linger a little: under load this turns thousands of tiny fsynced commits a
            # second into a few large ones, and the worker stops competing with the
            # event loop for the GIL on every request.
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.batch_size and batch[-1] is not _STOP:
                left = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item in batch):
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            try:
                self._process(batch)
            except Exception:  # the worker must outlive any bad request or bug
                logger.exception("monitoring observer failed on a batch of %d requests", len(batch))
            with self._progress:
                self._processed += len(batch)
                self._progress.notify_all()

    def _process(self, batch: list[Any]) -> None:
        records: list[PredictionRecord] = []
        for model, version, rid, created, inputs, outputs in batch:
            try:
                record = self._convert(model, version, rid, created, inputs, outputs)
            except Exception:
                logger.exception("cannot log a request of model %s version %s", model, version)
                continue
            if record is not None:
                records.append(record)
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
        self,
        model: str,
        version: int,
        rid: str,
        created: float,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> PredictionRecord | None:
        info = self.describe(model, version)
        x = inputs.get(info.input_name) if info.input_name else None
        if x is None:
            x = next(iter(inputs.values()), None)
        y = outputs.get(info.output_name) if info.output_name else None
        if y is None:
            y = next(iter(outputs.values()), None)
        if x is None or y is None:
            return None
        x, y = np.asarray(x), np.asarray(y)
        n = x.shape[0] if x.ndim else 1
        if x.dtype.kind not in "iufb" or y.dtype.kind not in "iufb" or (y.shape[0] if y.ndim else 1) != n:
            return None  # string or byte models: nothing to bin
        rows = x.reshape(n, -1).astype(np.float64)
        out = y.reshape(n, -1).astype(np.float64)
        predicted = predicted_values(out, info.task) if out.shape[1] else None
        self.windows.add(model, version, rows, predicted, out)
        return PredictionRecord(
            request_id=rid,
            model=model,
            version=version,
            created=created,
            inputs=rows[:, : self.sample_features].tolist(),
            outputs=out.tolist(),
            predicted=[] if predicted is None else predicted.tolist(),
            task=info.task,
            classes=info.classes,
        )
