"""The rollout tables of the store: each model's rollout state, and the traffic of each rollout.

``rollouts`` holds one JSON document per model with a revision: a write names the revision
it read and succeeds only if nobody wrote since (compare-and-set), so every worker and
replica may judge a rollout and exactly one transition wins. ``rollout_traffic`` and
``rollout_latency`` hold, per rollout, version and step, the requests, failed model calls,
shadow agreement and a latency histogram; each process adds what it served since its last
flush, so the totals are every worker's and every replica's.

The SQL is SQLAlchemy Core text with named parameters, valid on SQLite and PostgreSQL;
:class:`RolloutStore` runs it in the shared engine's transactions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.monitoring.stores.engine import StoreEngine

ROLLOUT_SCHEMA = tuple(
    sa.text(statement)
    for statement in (
        """CREATE TABLE IF NOT EXISTS rollouts (
        model TEXT NOT NULL PRIMARY KEY,
        revision INTEGER NOT NULL,
        doc TEXT NOT NULL
    )""",
        """CREATE TABLE IF NOT EXISTS rollout_traffic (
        rollout TEXT NOT NULL,
        version INTEGER NOT NULL,
        step INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        shadow_rows INTEGER NOT NULL,
        shadow_agreed INTEGER NOT NULL,
        PRIMARY KEY (rollout, version, step)
    )""",
        """CREATE TABLE IF NOT EXISTS rollout_latency (
        rollout TEXT NOT NULL,
        version INTEGER NOT NULL,
        step INTEGER NOT NULL,
        bucket INTEGER NOT NULL,
        calls INTEGER NOT NULL,
        PRIMARY KEY (rollout, version, step, bucket)
    )""",
    )
)
"""The rollout tables; created with the store's other tables."""

_SELECT_ALL = sa.text("SELECT model, revision, doc FROM rollouts")
_SELECT_ONE = sa.text("SELECT model, revision, doc FROM rollouts WHERE model = :model")
_INSERT = sa.text(
    "INSERT INTO rollouts (model, revision, doc) VALUES (:model, 1, :doc) ON CONFLICT (model) DO NOTHING"
)
_UPDATE = sa.text(
    "UPDATE rollouts SET revision = revision + 1, doc = :doc WHERE model = :model AND revision = :revision"
)
_DELETE = sa.text("DELETE FROM rollouts WHERE model = :model")
_ADD_TRAFFIC = sa.text(
    "INSERT INTO rollout_traffic (rollout, version, step, requests, errors, shadow_rows, shadow_agreed) "
    "VALUES (:rollout, :version, :step, :requests, :errors, :shadow_rows, :shadow_agreed) "
    "ON CONFLICT (rollout, version, step) DO UPDATE SET "
    "requests = rollout_traffic.requests + excluded.requests, "
    "errors = rollout_traffic.errors + excluded.errors, "
    "shadow_rows = rollout_traffic.shadow_rows + excluded.shadow_rows, "
    "shadow_agreed = rollout_traffic.shadow_agreed + excluded.shadow_agreed"
)
_ADD_LATENCY = sa.text(
    "INSERT INTO rollout_latency (rollout, version, step, bucket, calls) "
    "VALUES (:rollout, :version, :step, :bucket, :calls) "
    "ON CONFLICT (rollout, version, step, bucket) "
    "DO UPDATE SET calls = rollout_latency.calls + excluded.calls"
)
_SELECT_TRAFFIC = sa.text(
    "SELECT version, step, requests, errors, shadow_rows, shadow_agreed FROM rollout_traffic "
    "WHERE rollout = :rollout"
)
_SELECT_LATENCY = sa.text("SELECT version, step, bucket, calls FROM rollout_latency WHERE rollout = :rollout")


@dataclass(slots=True)
class RolloutDoc:
    """One model's stored rollout state.

    Attributes:
        model: Model name.
        revision: The stored revision this was read at (0: not stored yet).
        state: The state document (see :mod:`~modelloop.control.rollout.controller`).
    """

    model: str
    revision: int
    state: dict[str, Any]


@dataclass(slots=True)
class RolloutTraffic:
    """What one version served during one step of one rollout.

    Attributes:
        rollout: The rollout's id.
        version: The version.
        step: The step index it served at.
        requests: Model calls (live, or shadow copies in shadow mode).
        errors: Calls the model failed.
        shadow_rows: Rows of shadow copies compared with the champion's answer.
        shadow_agreed: Of those, rows whose answers agreed.
        latency: Latency bucket -> calls (:func:`~modelloop.control.rollout.controller.latency_bucket`).
    """

    rollout: str
    version: int
    step: int
    requests: int = 0
    errors: int = 0
    shadow_rows: int = 0
    shadow_agreed: int = 0
    latency: dict[int, int] = field(default_factory=dict)


def read_rollouts(conn: Connection, model: str | None) -> dict[str, RolloutDoc]:
    """Every stored rollout state, or one model's."""
    rows = conn.execute(_SELECT_ALL) if model is None else conn.execute(_SELECT_ONE, {"model": model})
    return {name: RolloutDoc(name, int(revision), orjson.loads(doc)) for name, revision, doc in rows}


def save_rollout(conn: Connection, doc: RolloutDoc) -> bool:
    """Compare-and-set: writes ``doc`` if the stored revision is still ``doc.revision``."""
    text = orjson.dumps(doc.state).decode()
    if doc.revision == 0:
        return conn.execute(_INSERT, {"model": doc.model, "doc": text}).rowcount == 1
    params = {"model": doc.model, "doc": text, "revision": doc.revision}
    return conn.execute(_UPDATE, params).rowcount == 1


def delete_rollout(conn: Connection, model: str) -> RolloutDoc | None:
    """Forgets a model's rollout state (its RETIRED versions included); returns what it was.

    The traffic totals stay: they are keyed by rollout id, and a new rollout gets a new one.
    """
    found = read_rollouts(conn, model).get(model)
    if found is not None:
        conn.execute(_DELETE, {"model": model})
    return found


def add_rollout_traffic(conn: Connection, rows: Sequence[RolloutTraffic]) -> None:
    """Adds counts and latency buckets, in key order (so concurrent upserts lock rows alike)."""
    ordered = sorted(rows, key=lambda r: (r.rollout, r.version, r.step))
    conn.execute(
        _ADD_TRAFFIC,
        [
            {
                "rollout": r.rollout,
                "version": r.version,
                "step": r.step,
                "requests": r.requests,
                "errors": r.errors,
                "shadow_rows": r.shadow_rows,
                "shadow_agreed": r.shadow_agreed,
            }
            for r in ordered
        ],
    )
    buckets = [
        {"rollout": r.rollout, "version": r.version, "step": r.step, "bucket": b, "calls": n}
        for r in ordered
        for b, n in sorted(r.latency.items())
    ]
    if buckets:
        conn.execute(_ADD_LATENCY, buckets)


def read_rollout_traffic(conn: Connection, rollout_id: str) -> list[RolloutTraffic]:
    """One rollout's totals, one row per version and step."""
    found: dict[tuple[int, int], RolloutTraffic] = {}
    for version, step, requests, errors, shadow_rows, shadow_agreed in conn.execute(
        _SELECT_TRAFFIC, {"rollout": rollout_id}
    ):
        found[(int(version), int(step))] = RolloutTraffic(
            rollout_id,
            int(version),
            int(step),
            int(requests),
            int(errors),
            int(shadow_rows),
            int(shadow_agreed),
        )
    latency: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
    for version, step, bucket, calls in conn.execute(_SELECT_LATENCY, {"rollout": rollout_id}):
        latency[(int(version), int(step))][int(bucket)] = int(calls)
    for key, buckets in latency.items():
        found.setdefault(key, RolloutTraffic(rollout_id, key[0], key[1])).latency = buckets
    return [found[key] for key in sorted(found)]


class RolloutStore:
    """Each model's rollout state and each rollout's traffic, on the shared engine.

    Args:
        engine: The database.
    """

    def __init__(self, engine: StoreEngine) -> None:
        self.engine = engine

    def rollouts(self, model: str | None = None) -> dict[str, RolloutDoc]:
        """The stored rollout state of every model (or of one), by model.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        return self.engine.transaction(lambda conn: read_rollouts(conn, model), write=False)

    def save_rollout(self, doc: RolloutDoc) -> bool:
        """Writes a rollout state if its stored revision is still ``doc.revision`` (0: none stored).

        Every worker and replica may decide a transition; the first write wins and the
        others see the new state on their next read.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        return self.engine.transaction(lambda conn: save_rollout(conn, doc), write=True)

    def add_rollout_traffic(self, rows: Sequence[RolloutTraffic]) -> None:
        """Adds request counts and latency buckets to the rollouts' totals, in one transaction.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        if rows:
            self.engine.transaction(lambda conn: add_rollout_traffic(conn, rows), write=True)

    def rollout_traffic(self, rollout_id: str) -> list[RolloutTraffic]:
        """The totals of one rollout, one row per version and step.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        return self.engine.transaction(lambda conn: read_rollout_traffic(conn, rollout_id), write=False)

    def delete_rollout(self, model: str) -> RolloutDoc | None:
        """Forgets a model's rollout state, RETIRED versions included; returns what it was.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        return self.engine.transaction(lambda conn: delete_rollout(conn, model), write=True)
