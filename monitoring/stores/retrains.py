"""The ``retrain_reports`` table: each retrain gate's report, one row per run.

:func:`~modelloop.control.retraining.job.retrain` keeps its gate's report here (and in the run
directory); the health page lists the newest, and the new-labels gate of the retrain
policy asks when the last one was kept.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.monitoring.stores.engine import StoreEngine, dumps

RETRAIN_SCHEMA = (
    sa.text(
        """CREATE TABLE IF NOT EXISTS retrain_reports (
        model TEXT NOT NULL,
        run_id TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        outcome TEXT NOT NULL,
        report TEXT NOT NULL,
        PRIMARY KEY (model, run_id)
    )"""
    ),
)
"""The ``retrain_reports`` table; created with the store's other tables."""
_INSERT_REPORT = sa.text(
    "INSERT INTO retrain_reports (model, run_id, created, outcome, report) "
    "VALUES (:model, :run_id, :created, :outcome, :report) ON CONFLICT (model, run_id) DO NOTHING"
)
_SELECT_REPORTS = sa.text(
    "SELECT report FROM retrain_reports WHERE model = :model ORDER BY created DESC LIMIT :limit"
)
_LAST_REPORT = sa.text("SELECT MAX(created) FROM retrain_reports WHERE model = :model")


class RetrainReportStore:
    """The retrain gate's reports, on the shared engine.

    Args:
        engine: The database.
    """

    def __init__(self, engine: StoreEngine) -> None:
        self.engine = engine

    def record_retrain(self, model: str, run_id: str, outcome: str, report: Mapping[str, Any]) -> None:
        """Keeps one retrain gate report (a second report of the same run is ignored).

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        params = {
            "model": model,
            "run_id": run_id,
            "created": time.time(),
            "outcome": outcome,
            "report": dumps(report),
        }
        self.engine.transaction(lambda conn: conn.execute(_INSERT_REPORT, params), write=True)

    def retrain_reports(self, model: str, limit: int = 10) -> list[dict[str, Any]]:
        """The newest ``limit`` gate reports of a model, newest first.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> list[Any]:
            return list(conn.execute(_SELECT_REPORTS, {"model": model, "limit": limit}).all())

        return [orjson.loads(report) for (report,) in self.engine.transaction(work, write=False)]

    def last_retrain_time(self, model: str) -> float | None:
        """When the newest retrain report of a model was kept, or None.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> float | None:
            value = conn.execute(_LAST_REPORT, {"model": model}).scalar_one()
            return None if value is None else float(value)

        return self.engine.transaction(work, write=False)
