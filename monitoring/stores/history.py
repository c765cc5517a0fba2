"""The ``history`` table: one evaluation point per model, version and time.

The points themselves (:class:`~modelloop.monitoring.history.HistoryPoint`) are made by the
monitoring loop; this store keeps them, reads a series back and applies the history's own
retention (an age and a number of points per version).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.monitoring.history import HistoryPoint
from modelloop.monitoring.stores.engine import StoreEngine, dumps

HISTORY_SCHEMA = tuple(
    sa.text(statement)
    for statement in (
        """CREATE TABLE IF NOT EXISTS history (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        t DOUBLE PRECISION NOT NULL,
        point TEXT NOT NULL,
        PRIMARY KEY (model, version, t)
    )""",
        "CREATE INDEX IF NOT EXISTS history_t ON history (t)",
    )
)
"""The ``history`` table; created with the store's other tables."""

_INSERT_POINT = sa.text(
    "INSERT INTO history (model, version, t, point) VALUES (:model, :version, :t, :point) "
    "ON CONFLICT (model, version, t) DO NOTHING"
)
_SELECT_VERSIONS = sa.text("SELECT DISTINCT version FROM history WHERE model = :model AND t >= :since")
_SELECT_POINTS = sa.text(
    "SELECT t, point FROM history WHERE model = :model AND version = :version AND t >= :since "
    "ORDER BY t DESC LIMIT :limit"
)
_DELETE_OLDER = sa.text("DELETE FROM history WHERE t < :cutoff")
_SELECT_SERIES = sa.text("SELECT DISTINCT model, version FROM history")
_NTH_NEWEST = sa.text(
    "SELECT t FROM history WHERE model = :model AND version = :version ORDER BY t DESC LIMIT 1 OFFSET :offset"
)
_DELETE_UP_TO = sa.text("DELETE FROM history WHERE model = :model AND version = :version AND t <= :t")


class HistoryStore:
    """Evaluation points, on the shared engine.

    Args:
        engine: The database.
    """

    def __init__(self, engine: StoreEngine) -> None:
        self.engine = engine

    def record_history(self, points: Sequence[HistoryPoint]) -> None:
        """Stores evaluation points in one transaction; a repeated ``(model, version, t)`` keeps the first.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        if not points:
            return
        rows = [
            {"model": p.model, "version": p.version, "t": p.t, "point": dumps(p.values)}
            for p in sorted(points, key=lambda p: (p.model, p.version, p.t))
        ]

        def work(conn: Connection) -> None:
            conn.execute(_INSERT_POINT, rows)

        self.engine.transaction(work, write=True)

    def history(self, model: str, *, since: float, limit: int) -> dict[int, list[HistoryPoint]]:
        """Per version of ``model``, its newest ``limit`` points at or after ``since``, oldest first.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> dict[int, list[Any]]:
            versions = [int(v) for (v,) in conn.execute(_SELECT_VERSIONS, {"model": model, "since": since})]
            return {
                v: list(
                    conn.execute(
                        _SELECT_POINTS, {"model": model, "version": v, "since": since, "limit": limit}
                    ).all()
                )
                for v in sorted(versions)
            }

        fetched = self.engine.transaction(work, write=False)
        return {
            v: [HistoryPoint(model, v, float(t), orjson.loads(point)) for t, point in reversed(rows)]
            for v, rows in fetched.items()
        }

    def prune_history(self, *, retention_days: float, max_points: int, now: float | None = None) -> int:
        """Deletes points older than ``retention_days`` and beyond ``max_points`` per version.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        cutoff = (time.time() if now is None else now) - retention_days * 86400.0

        def work(conn: Connection) -> int:
            deleted = max(conn.execute(_DELETE_OLDER, {"cutoff": cutoff}).rowcount, 0)
            for model, version in list(conn.execute(_SELECT_SERIES).all()):
                key = {"model": model, "version": version}
                row = conn.execute(_NTH_NEWEST, {**key, "offset": max_points}).first()
                if row is not None:
                    deleted += max(conn.execute(_DELETE_UP_TO, {**key, "t": row[0]}).rowcount, 0)
            return deleted

        return self.engine.transaction(work, write=True)
