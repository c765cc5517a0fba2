"""The prediction log in SQL: one row per segment, read in order from a persisted cursor.

Serving processes append segments (Arrow IPC streams, :mod:`modelloop.serving.predlog`);
the control plane reads them in sequence order, after its cursor, and moves the cursor only
once what it read is stored. Several servers (workers, replicas) append to one log, so the
control plane sees all of their traffic once.

``prediction_log (seq, created, rows, payload)`` has an increasing ``seq``. On SQLite the
writers take turns, so sequence order is commit order. On PostgreSQL two writers can commit
out of order (``seq`` 8 may become visible before 7); the reader therefore reads only
segments older than ``settle_s`` (a transaction of one INSERT commits well within it) and
never moves its cursor past a gap younger than that.

The cursor is a row of ``log_cursors (name, seq)``. Segments the cursor passed are pruned
after ``retention_s`` (a day), or sooner beyond ``max_segments``; segments not read yet are
never pruned.

Example:

```python
log = SqlPredictionLog(store)
log.append(segment, rows=256)           # a serving process
for seq, payload in log.read(after=log.cursor(), limit=64):
    ...                                  # the control plane
log.advance(seq)
```
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.logformat import LOG_SCHEMA, decode_segment
from modelloop.monitoring.predlog import PredictionLog
from modelloop.monitoring.stores.engine import StoreEngine as SqlPredictionStore

CURSOR = "monitor"
"""The control plane's cursor name."""

_SCHEMA = {
    "sqlite": (
        "CREATE TABLE IF NOT EXISTS prediction_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "created DOUBLE PRECISION NOT NULL, rows INTEGER NOT NULL, payload BLOB NOT NULL)",
    ),
    "postgresql": (
        "CREATE TABLE IF NOT EXISTS prediction_log (seq BIGSERIAL PRIMARY KEY, "
        "created DOUBLE PRECISION NOT NULL, rows INTEGER NOT NULL, payload BYTEA NOT NULL)",
    ),
}
_CURSORS = "CREATE TABLE IF NOT EXISTS log_cursors (name TEXT PRIMARY KEY, seq BIGINT NOT NULL)"
_APPEND = sa.text("INSERT INTO prediction_log (created, rows, payload) VALUES (:created, :rows, :payload)")
_READ = sa.text(
    "SELECT seq, created, payload FROM prediction_log WHERE seq > :after AND created <= :before "
    "ORDER BY seq LIMIT :limit"
)
_CURSOR = sa.text("SELECT seq FROM log_cursors WHERE name = :name")
_SET_CURSOR = sa.text(
    "INSERT INTO log_cursors (name, seq) VALUES (:name, :seq) "
    "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > log_cursors.seq"
)
_LAST = sa.text("SELECT COALESCE(MAX(seq), 0) FROM prediction_log")
_BACKLOG = sa.text("SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM prediction_log WHERE seq > :after")
_PRUNE = sa.text("DELETE FROM prediction_log WHERE seq <= :upto AND created < :cutoff")
_NTH_READ = sa.text(
    "SELECT seq FROM prediction_log WHERE seq <= :upto ORDER BY seq DESC LIMIT 1 OFFSET :keep"
)
_PRUNE_UPTO = sa.text("DELETE FROM prediction_log WHERE seq <= :upto")
_SINCE = sa.text(
    "SELECT seq, payload FROM prediction_log WHERE created >= :since AND seq > :after "
    "ORDER BY seq LIMIT :limit"
)


class SqlPredictionLog:
    """The prediction log on the store's engine (SQLite or PostgreSQL).

    Args:
        store: The store whose engine and transactions it uses.
        settle_s: On PostgreSQL, how old a segment must be before it is read (so that
            a writer that committed late is not skipped). Defaults to 1.0.
        retention_s: How long a read segment is kept (for ``modelloop log export``).
            Defaults to one day.
        max_segments: Most read segments kept (a busy server writes four a second).
            Defaults to 20000.
        poll_interval_s: How often the control plane looks for new segments. Defaults to 0.2.
    """

    def __init__(
        self,
        store: SqlPredictionStore,
        *,
        settle_s: float = 1.0,
        retention_s: float = 86400.0,
        max_segments: int = 20_000,
        poll_interval_s: float = 0.2,
    ) -> None:
        self.store = store
        self.settle_s = settle_s if store.dialect == "postgresql" else 0.0
        self.retention_s = retention_s
        self.max_segments = max_segments
        self.poll_interval_s = poll_interval_s
        self._ready = False
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return

            def work(conn: Connection) -> None:
                for statement in (*_SCHEMA[self.store.dialect], _CURSORS):
                    conn.execute(sa.text(statement))

            self.store.transaction(work, write=True)
            self._ready = True

    # -- serving: the sink --------------------------------------------------------------

    def append(self, segment: bytes, *, rows: int) -> None:
        """Stores one segment (one INSERT, committed before it returns).

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        self._ensure()
        params = {"created": time.time(), "rows": rows, "payload": segment}
        self.store.transaction(lambda conn: conn.execute(_APPEND, params), write=True)

    # -- the control plane: the reader -------------------------------------------------

    def cursor(self, name: str = CURSOR) -> int:
        """The last segment a reader has processed (0 before the first)."""
        self._ensure()

        def work(conn: Connection) -> int:
            value = conn.execute(_CURSOR, {"name": name}).scalar_one_or_none()
            return 0 if value is None else int(value)

        return self.store.transaction(work, write=False)

    def read(self, after: int, limit: int = 64) -> list[tuple[int, bytes]]:
        """Up to ``limit`` segments after ``after``, in order, stopping before a young gap.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        self._ensure()
        before = time.time() - self.settle_s

        def work(conn: Connection) -> list[Any]:
            return list(conn.execute(_READ, {"after": after, "before": before, "limit": limit}).all())

        rows = self.store.transaction(work, write=False)
        found: list[tuple[int, bytes]] = []
        expected = after + 1
        for seq, created, payload in rows:
            # A gap younger than the settle time may be a transaction that has not committed yet.
            if self.settle_s and seq != expected and float(created) > before - self.settle_s:
                break
            found.append((int(seq), bytes(payload)))
            expected = int(seq) + 1
        return found

    def advance(self, seq: int, name: str = CURSOR) -> None:
        """Moves a reader's cursor forward to ``seq`` (never back).

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        self._ensure()
        self.store.transaction(lambda conn: conn.execute(_SET_CURSOR, {"name": name, "seq": seq}), write=True)

    def last(self) -> int:
        """The newest segment's sequence number (0 when the log is empty)."""
        self._ensure()
        return self.store.transaction(lambda conn: int(conn.execute(_LAST).scalar_one()), write=False)

    def reached(self, position: int, target: int) -> bool:
        """Whether a reader at ``position`` has read every segment up to ``target``."""
        return position >= target

    def segments_since(self, since: float) -> Iterator[bytes]:
        """Every kept segment written at or after the Unix time ``since``, in order (for export)."""
        after = 0
        while segments := self.since(since, after=after):
            for seq, payload in segments:
                after = seq
                yield payload

    def backlog(self, after: int) -> tuple[int, int]:
        """Segments and rows after ``after``: what a reader still has to read."""
        self._ensure()

        def work(conn: Connection) -> tuple[int, int]:
            segments, rows = conn.execute(_BACKLOG, {"after": after}).one()
            return int(segments), int(rows)

        return self.store.transaction(work, write=False)

    def since(self, since: float, *, after: int = 0, limit: int = 256) -> list[tuple[int, bytes]]:
        """Segments written at or after the Unix time ``since`` (for export), in order."""
        self._ensure()

        def work(conn: Connection) -> list[Any]:
            return list(conn.execute(_SINCE, {"since": since, "after": after, "limit": limit}).all())

        return [(int(seq), bytes(payload)) for seq, payload in self.store.transaction(work, write=False)]

    def prune(self, upto: int, now: float | None = None) -> int:
        """Deletes read segments (at or before ``upto``) older than the retention, or beyond ``max_segments``.

        Returns:
            Segments deleted.
        """
        self._ensure()
        cutoff = (time.time() if now is None else now) - self.retention_s

        def work(conn: Connection) -> int:
            deleted = max(conn.execute(_PRUNE, {"upto": upto, "cutoff": cutoff}).rowcount, 0)
            # Past the bound, the oldest read segments go whatever their age.
            row = conn.execute(_NTH_READ, {"upto": upto, "keep": self.max_segments}).first()
            if row is not None:
                deleted += max(conn.execute(_PRUNE_UPTO, {"upto": int(row[0])}).rowcount, 0)
            return deleted

        return self.store.transaction(work, write=True)


def export_parquet(log: PredictionLog[Any], model: str, since: float, out: Path) -> int:
    """Writes a model's logged predictions since a time as one Parquet file.

    One row per logged prediction row, in the log's schema (:data:`LOG_SCHEMA`): pandas
    (``pd.read_parquet``), DuckDB and Spark read it as it is. Segments another version
    wrote are skipped. The file appears whole (written beside it, then renamed).

    Args:
        log: The prediction log (the SQL store's, or objects under a prefix).
        model: The model.
        since: Unix time: segments written at or after it.
        out: The file.

    Returns:
        Rows written.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    with pq.ParquetWriter(tmp, LOG_SCHEMA) as writer:
        for payload in log.segments_since(since):
            try:
                batches = decode_segment(payload)
            except ValueError:
                continue
            for batch in batches:
                mine = batch.filter(pc.equal(batch.column("model"), pa.scalar(model)))
                mine = mine.filter(pc.greater_equal(mine.column("time"), pa.scalar(since)))
                if mine.num_rows:
                    writer.write_batch(mine)
                    rows += mine.num_rows
    tmp.replace(out)
    return rows
