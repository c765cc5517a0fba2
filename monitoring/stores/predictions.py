"""The ``predictions`` table: one row per logged request, what labels join.

Every answered request is stored with its request id, model, version, time, a bounded
sample of its inputs, its outputs and its predicted classes or values. A repeated
``(model, request_id)`` keeps the first row; a request id that answered two different
inputs is ambiguous: both are stored, and no label joins them. Retention bounds the table
by age and by rows, and a pruned prediction's labels go with it.

Example:

```python
predictions = PredictionStore(engine)
predictions.record([PredictionRecord("r1", "digits", 1, time.time(), [[0.0] * 64], [[0.1] * 10], [3])])
```
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.monitoring.stores.engine import StoreEngine, chunks, dumps
from modelloop.monitoring.stores.records import PredictionRecord

PREDICTIONS_SCHEMA = tuple(
    sa.text(statement)
    for statement in (
        """CREATE TABLE IF NOT EXISTS predictions (
        model TEXT NOT NULL,
        request_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        task TEXT NOT NULL,
        classes INTEGER NOT NULL,
        n_rows INTEGER NOT NULL,
        inputs TEXT NOT NULL,
        outputs TEXT NOT NULL,
        predicted TEXT NOT NULL,
        input_hash TEXT NOT NULL DEFAULT '',
        ambiguous INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (model, request_id)
    )""",
        "CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created)",
        "CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created)",
    )
)
"""The ``predictions`` table; created with the store's other tables."""
# Columns added since the first schema: (table, column, definition). An older database
# gets them with ALTER TABLE; the defaults describe the rows it already holds.
PREDICTIONS_ADDED_COLUMNS = (
    # A digest of the request's input rows: a repeated id with the same input is a retry,
    # with another input the id is ambiguous and its labels are refused.
    ("predictions", "input_hash", "TEXT NOT NULL DEFAULT ''"),
    ("predictions", "ambiguous", "INTEGER NOT NULL DEFAULT 0"),
)

# thousands of rows a second, and building SQLAlchemy's bound-parameter dicts for each row
# cost as much as SQLite's own insert. ``{p}`` becomes the driver's placeholder.
#
# A repeated (model, request_id) keeps the first row; when its input differs, both the first
# row and the later request (logged under ``<id>#<digest>``) are marked ambiguous, in the
# same statement, so that replicas writing one id at the same moment still mark it.
_INSERT_PREDICTION_DRIVER = (
    "INSERT INTO predictions (model, request_id, version, created, task, classes, n_rows, "
    "inputs, outputs, predicted, input_hash, ambiguous) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}) "
    "ON CONFLICT (model, request_id) DO UPDATE SET ambiguous = CASE "
    "WHEN predictions.input_hash <> '' AND excluded.input_hash <> '' "
    "AND predictions.input_hash <> excluded.input_hash THEN 1 ELSE predictions.ambiguous END"
)
_SELECT_HASHES = sa.text(
    "SELECT request_id, input_hash FROM predictions WHERE model = :model AND request_id IN :ids"
).bindparams(sa.bindparam("ids", expanding=True))
# The other statements are built once: a TextClause is immutable and safe to share between
# threads, and the engine caches its compiled form per dialect.
_DELETE_OLDER = sa.text("DELETE FROM predictions WHERE created < :cutoff")
_NTH_NEWEST = sa.text("SELECT created FROM predictions ORDER BY created DESC LIMIT 1 OFFSET :offset")
_DELETE_UP_TO = sa.text("DELETE FROM predictions WHERE created <= :created")
_DELETE_ORPHAN_FEEDBACK = sa.text(
    "DELETE FROM feedback WHERE NOT EXISTS (SELECT 1 FROM predictions p "
    "WHERE p.model = feedback.model AND p.request_id = feedback.request_id)"
)
_SELECT_PREDICTED_SINCE = sa.text(
    "SELECT predicted FROM predictions WHERE model = :model AND version = :version AND created >= :since "
    "ORDER BY created DESC LIMIT :limit"
)


class PredictionWriter(Protocol):
    """Where the recorder stores the requests the log's reader reads; may raise ``StoreUnavailable``."""

    def record(self, records: Sequence[PredictionRecord]) -> None:
        """Logs predictions; a repeated ``(model, request_id)`` keeps the first."""


class PredictionStore:
    """The logged predictions, on the shared engine.

    Args:
        engine: The database.
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Predictions older than this are deleted. Defaults to 30.
    """

    def __init__(
        self, engine: StoreEngine, *, retention_rows: int = 1_000_000, retention_days: float = 30.0
    ) -> None:
        self.engine = engine
        self.retention_rows = retention_rows
        self.retention_days = retention_days

    def record(self, records: Sequence[PredictionRecord]) -> None:
        """Logs predictions in one transaction.

        Args:
            records: The predictions; a repeated ``(model, request_id)`` keeps the first.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        if not records:
            return
        statement = _INSERT_PREDICTION_DRIVER.format(p=self.engine.placeholder)

        def work(conn: Connection) -> None:
            # Ids already logged with another input: the later request is logged too, under
            # `<id>#<digest>`, and both are marked ambiguous (the insert's ON CONFLICT marks
            # the first). Every answered request is logged, whatever id it chose.
            known: dict[tuple[str, str], str] = {}
            by_model: dict[str, list[str]] = defaultdict(list)
            for r in records:
                by_model[r.model].append(r.request_id)
            for model, ids in by_model.items():
                for chunk in chunks(list(dict.fromkeys(ids))):
                    for rid, digest in conn.execute(_SELECT_HASHES, {"model": model, "ids": list(chunk)}):
                        known[(model, rid)] = str(digest)
            rows = []
            for r in records:
                key, rid, ambiguous = (r.model, r.request_id), r.request_id, 0
                first = known.setdefault(key, r.input_hash)
                if first != r.input_hash and first and r.input_hash:
                    rid, ambiguous = f"{r.request_id}#{r.input_hash[:16]}", 1
                rows.append(
                    (
                        r.model,
                        rid,
                        r.version,
                        r.created,
                        r.task,
                        r.classes,
                        len(r.predicted),
                        dumps(r.inputs),
                        dumps(r.outputs),
                        dumps(r.predicted),
                        r.input_hash,
                        ambiguous,
                    )
                )
                if ambiguous:
                    # The same row again under the first id: its ON CONFLICT marks the first.
                    rows.append((*rows[-1][:1], r.request_id, *rows[-1][2:]))
            # Sorted by key: concurrent writers then lock the rows in one order (no deadlock).
            rows.sort(key=lambda row: (row[0], row[1]))
            # Positional tuples straight to the driver's executemany, in the same transaction
            # handling as every other statement.
            conn.exec_driver_sql(statement, rows)

        self.engine.transaction(work, write=True)

    def predicted_since(self, model: str, version: int, since: float, limit: int) -> list[float]:
        """The predicted classes (or values) of one version's newest ``limit`` requests since ``since``.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        params = {"model": model, "version": version, "since": since, "limit": limit}

        def work(conn: Connection) -> list[float]:
            rows = conn.execute(_SELECT_PREDICTED_SINCE, params)
            return [float(value) for (predicted,) in rows for value in orjson.loads(predicted)]

        return self.engine.transaction(work, write=False)

    def prune(self, now: float | None = None) -> int:
        """Deletes predictions beyond the retention bounds, with their labels.

        Args:
            now: Unix time to measure age from. Defaults to the current time.

        Returns:
            Predictions deleted.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400.0

        def work(conn: Connection) -> int:
            deleted = max(conn.execute(_DELETE_OLDER, {"cutoff": cutoff}).rowcount, 0)
            row = conn.execute(_NTH_NEWEST, {"offset": self.retention_rows}).first()
            if row is not None:
                # `<=`: the row at the offset is the first one beyond the bound.
                deleted += max(conn.execute(_DELETE_UP_TO, {"created": row[0]}).rowcount, 0)
            if deleted:
                conn.execute(_DELETE_ORPHAN_FEEDBACK)
            return deleted

        return self.engine.transaction(work, write=True)
