"""The control plane's reader of the prediction log: segments in, stored predictions and windows out.

One thread reads the segments after the persisted cursor, in order, decodes each Arrow
record batch back into answered requests, and hands them to
:meth:`LogRecorder.write <modelloop.monitoring.recorder.LogRecorder.write>`
(the predictions table for the label join, then the drift windows). The cursor moves only
after a segment's requests are stored, so a control plane killed at any moment re-reads at
most the segments it had not confirmed; the predictions table keeps one row per
``(model, request_id)``, so nothing is counted twice.

A segment that cannot be decoded (another version wrote it, or it is corrupt) is counted in
``modelloop_log_segments_skipped_total``, logged, and skipped: it never stops the loop. A
store that cannot be reached stops the reading until it returns; the log keeps what the
servers write meanwhile.

Example:

```python
ingest = LogIngest(SqlPredictionLog(store), recorder, metrics)  # or ObjectPredictionLog(url, store=store)
ingest.start()
ingest.catch_up(timeout=2)  # everything logged so far is stored
ingest.stop()
```
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa

from modelloop.logformat import decode_segment
from modelloop.monitoring.history import LoggedTraffic
from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.predlog import PredictionLog
from modelloop.monitoring.recorder import LogRecorder
from modelloop.monitoring.stores.engine import StoreUnavailable

logger = logging.getLogger(__name__)

# Seconds between two "store unavailable" warnings.
_WARN_EVERY_S = 30.0
# Seconds between two prunes of read segments.
_PRUNE_EVERY_S = 300.0


def _matrix(column: pa.ListArray, rows: int) -> np.ndarray:
    """A list<float32> column as a ``[rows, width]`` array (an object array of rows when widths differ)."""
    if rows == 0:
        return np.zeros((0, 0), np.float32)
    offsets = column.offsets.to_numpy(zero_copy_only=False)
    offsets = offsets - offsets[0]
    values = column.flatten().to_numpy(zero_copy_only=False)
    widths = np.diff(offsets)
    if np.all(widths == widths[0]):
        return values.reshape(rows, int(widths[0]))
    ragged = np.empty(rows, dtype=object)
    for i, (a, b) in enumerate(itertools.pairwise(offsets)):
        ragged[i] = values[a:b]
    return ragged


def decode_requests(batch: pa.RecordBatch) -> list[tuple[Any, ...]]:
    """The answered requests of one record batch, as the recorder takes them.

    Returns:
        ``(model, version, request_id, time, inputs, outputs, None, digest)`` per request,
        with ``inputs`` and ``outputs`` each one ``[rows, columns]`` float32 array.
    """
    rows = batch.num_rows
    if rows == 0:
        return []
    ids = batch.column("request_id").to_pylist()
    models = batch.column("model").to_pylist()
    versions = batch.column("version").to_numpy()
    times = batch.column("time").to_numpy()
    digests = batch.column("input_digest").to_pylist()
    starts = np.flatnonzero(batch.column("row").to_numpy() == 0)
    x = _matrix(batch.column("inputs"), rows)
    y = _matrix(batch.column("outputs"), rows)
    ends = [*starts[1:].tolist(), rows]
    items: list[tuple[Any, ...]] = []
    for start, end in zip(starts.tolist(), ends, strict=True):
        xs, ys = x[start:end], y[start:end]
        if xs.dtype == object:  # rows of different widths: one request has one width
            xs, ys = np.stack(list(xs)), np.stack(list(ys))
        items.append(
            (
                models[start],
                int(versions[start]),
                ids[start],
                float(times[start]),
                {"inputs": xs.astype(np.float32, copy=False)},
                {"outputs": ys.astype(np.float32, copy=False)},
                None,
                digests[start],
            )
        )
    return items


class LogIngest:
    """Reads the prediction log from the cursor and stores what it reads.

    Args:
        log: The prediction log, through its port (:class:`PredictionLog`): the SQL
            store's, or objects under a prefix.
        recorder: Converts and stores the requests, and fills the drift windows.
        metrics: Where skipped segments and the backlog are exported.
        interval_s: How often the thread looks for new segments. Defaults to None: the
            log's ``poll_interval_s``.
        batch_segments: Most segments read at a time. Defaults to 32.
        prune: Whether this reader prunes the segments it read (one reader does).
            Defaults to True.
        traffic: Where the requests read are counted with their latencies (a control
            plane's history). Defaults to None.
    """

    def __init__(
        self,
        log: PredictionLog[Any],
        recorder: LogRecorder,
        metrics: MonitoringMetrics,
        *,
        interval_s: float | None = None,
        batch_segments: int = 32,
        prune: bool = True,
        traffic: LoggedTraffic | None = None,
    ) -> None:
        self.traffic = traffic
        self.log = log
        self.recorder = recorder
        self.metrics = metrics
        self.interval_s = log.poll_interval_s if interval_s is None else interval_s
        self.batch_segments = batch_segments
        self.prune = prune
        self._cursor: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_warning = 0.0
        self._last_prune = 0.0
        self.stored = 0
        self.skipped = 0

    @property
    def cursor(self) -> Any:
        """The position after the last segment stored, as this process knows it (None before
        the first read): a sequence number in SQL, the keys read recently in object storage."""
        return self._cursor

    def start(self) -> None:
        """Starts the reading thread (once)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="log-ingest", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Reads what is there, then stops."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                while self.step() and not self._stopping:
                    pass
            except StoreUnavailable as exc:
                now = time.monotonic()
                if now - self._last_warning >= _WARN_EVERY_S:
                    self._last_warning = now
                    logger.warning("prediction log unavailable; reading resumes when it returns: %s", exc)
            except Exception:  # the loop must outlive any bug
                logger.exception("reading the prediction log failed")
            if stopping:
                return

    def step(self) -> int:
        """Reads and stores one batch of segments after the cursor.

        Returns:
            Segments read (0 when the log had nothing new).

        Raises:
            StoreUnavailable: The store cannot be reached; the cursor did not move.
        """
        with self._lock:
            if self._cursor is None:
                self._cursor = self.log.cursor()
            segments = self.log.read(self._cursor, self.batch_segments)
            self._maybe_prune()
            if not segments:
                return 0
            items: list[tuple[Any, ...]] = []
            for seq, payload in segments:
                try:
                    for batch in decode_segment(payload):
                        items.extend(decode_requests(batch))
                        if self.traffic is not None:
                            self._count(batch)
                except (ValueError, KeyError, pa.ArrowException) as exc:
                    self.skipped += 1
                    self.metrics.log_segments_skipped.inc()
                    logger.error("prediction log segment %s skipped: %s", seq, exc)
            if items:
                self.stored += self.recorder.write(items)
            last = segments[-1][0]
            self.log.advance(last)
            self._cursor = last
            return len(segments)

    def _count(self, batch: pa.RecordBatch) -> None:
        assert self.traffic is not None  # noqa: S101 - the caller checked
        first = batch.column("row").to_numpy() == 0
        models = np.asarray(batch.column("model").to_pylist(), dtype=object)[first]
        versions = batch.column("version").to_numpy()[first]
        latencies = batch.column("latency_s").to_numpy()[first]
        for model, version in {(str(m), int(v)) for m, v in zip(models, versions, strict=True)}:
            mine = (models == model) & (versions == version)
            self.traffic.add(model, version, latencies[mine])

    def catch_up(self, timeout: float = 5.0) -> bool:
        """Reads until the cursor reaches the log's newest segment as of this call.

        At least one read runs, so a segment that arrived late (a slower writer's object,
        listed before newer ones) is read too: reads take the oldest unread segments first.

        Returns:
            Whether it did in time.
        """
        deadline = time.monotonic() + timeout
        try:
            target = self.log.last()
            while True:
                read = self.step()
                if self.log.reached(self._cursor, target):
                    return True
                if time.monotonic() >= deadline:
                    return self.log.reached(self._cursor, target)
                if not read:
                    time.sleep(0.02)
        except StoreUnavailable:
            return False

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if not self.prune or now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        pruned = self.log.prune(self.cursor)
        if pruned:
            logger.info("pruned %d read segments of the prediction log", pruned)
