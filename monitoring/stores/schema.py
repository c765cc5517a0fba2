"""Every table of the store's database, created in one transaction, and older databases upgraded.

Each kind of data declares its own tables beside its store; this module runs them all, in
one order, under the engine's schema lock, then brings a database written by an older
version up to date in place: the missing ``source`` and ``quarantined`` columns of
``feedback`` are added (old labels become ``anonymous``), and ``input_hash`` and
``ambiguous`` of ``predictions``; a ``feedback`` table keyed by prediction is rebuilt with
one label per (prediction, source); and ``feedback_stats`` is built from the labels already
there, so their sources are assessed too.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.monitoring.stores.binding import BINDING_SCHEMA
from modelloop.monitoring.stores.feedback import (
    FEEDBACK_ADDED_COLUMNS,
    FEEDBACK_COLUMNS,
    FEEDBACK_SCHEMA,
    FEEDBACK_TABLE,
    STATS_SCHEMA,
    STATS_TABLE,
    count_all_labels,
)
from modelloop.monitoring.stores.history import HISTORY_SCHEMA
from modelloop.monitoring.stores.predictions import PREDICTIONS_ADDED_COLUMNS, PREDICTIONS_SCHEMA
from modelloop.monitoring.stores.retrains import RETRAIN_SCHEMA
from modelloop.monitoring.stores.rollouts import ROLLOUT_SCHEMA

logger = logging.getLogger(__name__)


def create_schema(conn: Connection) -> None:
    """Creates the tables that do not exist yet and upgrades older ones (the engine's schema)."""
    for statement in (
        *PREDICTIONS_SCHEMA,
        *FEEDBACK_SCHEMA,
        *HISTORY_SCHEMA,
        *ROLLOUT_SCHEMA,
        *BINDING_SCHEMA,
    ):
        conn.execute(statement)
    _upgrade(conn)


def _upgrade(conn: Connection) -> None:
    """Brings a database written by an older version up to the current schema.

    Runs in the schema transaction, under the schema lock: the missing columns are added,
    and a ``feedback_stats`` table that did not exist yet is filled from the labels
    already stored, so their sources are assessed too.
    """
    inspector = sa.inspect(conn)
    for table, column, definition in (*FEEDBACK_ADDED_COLUMNS, *PREDICTIONS_ADDED_COLUMNS):
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            logger.info("upgrading the store: adding %s.%s", table, column)
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {definition}"))
    if "source" not in inspector.get_pk_constraint("feedback").get("constrained_columns", []):
        # One label per prediction before: rebuild with one per (prediction, source). Every
        # stored row fits the wider key, so nothing is lost.
        logger.info("upgrading the store: feedback keeps one label per source")
        conn.execute(sa.text(FEEDBACK_TABLE.format(name="feedback_upgrade")))
        conn.execute(
            sa.text(
                f"INSERT INTO feedback_upgrade ({FEEDBACK_COLUMNS}) SELECT {FEEDBACK_COLUMNS} FROM feedback"
            )
        )
        conn.execute(sa.text("DROP TABLE feedback"))
        conn.execute(sa.text("ALTER TABLE feedback_upgrade RENAME TO feedback"))
        conn.execute(
            sa.text("CREATE INDEX IF NOT EXISTS feedback_version ON feedback (model, version, created)")
        )
    had_stats = inspector.has_table(STATS_TABLE)
    for statement in (*STATS_SCHEMA, *RETRAIN_SCHEMA):
        conn.execute(statement)
    if not had_stats:
        count_all_labels(conn)
