"""Which model repository a store describes: its identity, recorded once.

Everything the store keeps is keyed by model name and version number (predictions,
labels, history, rollouts and their RETIRED versions), and those only mean something for
the repository they were written about. The ``repository`` table holds one row: the
identity of the repository the store describes, and where it was. A server binds its
store at start-up (:func:`bind_repository`):

- a store with no row (new, or from before the row existed) adopts the repository it
  first sees;
- the same repository goes on;
- another repository is refused (:class:`RepositoryMismatch`): the server stops with one
  line naming both and what to do (another ``--state-dir`` or ``--store``, or clear the
  state). A separate namespace per repository inside one store was not chosen: the
  repository is the unit of everything the store keeps, so a store per repository keeps
  retention, backups and clearing simple, and a mix-up is an operator's mistake worth
  stopping on.

A repository's identity (:class:`RepositoryIdentity`) is the random id a local repository
holds (:data:`modelloop.layout.REPOSITORY_ID_FILE`), ``path:<directory>`` for a local
repository without one that cannot be written (mounted read-only), or ``url:<URL>`` for
a repository in object storage. Replicas sharing one PostgreSQL store serve one repository
(one shared volume, or one bucket prefix), so they read the same identity. When either
side is a ``path:`` identity, the locations are compared instead, so a read-only repository
that later gains an id file keeps its store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop import layout
from modelloop.errors import ErrorCode, ServiceError
from modelloop.monitoring.stores.engine import StoreEngine

BINDING_SCHEMA = (
    sa.text(
        """CREATE TABLE IF NOT EXISTS repository (
        slot INTEGER NOT NULL PRIMARY KEY,
        id TEXT NOT NULL,
        location TEXT NOT NULL,
        bound REAL NOT NULL
    )"""
    ),
)
"""The repository table; created with the store's other tables."""

_SELECT = sa.text("SELECT id, location, bound FROM repository WHERE slot = 1")
_INSERT = sa.text(
    "INSERT INTO repository (slot, id, location, bound) VALUES (1, :id, :location, :bound) "
    "ON CONFLICT (slot) DO NOTHING"
)
_UPDATE = sa.text("UPDATE repository SET id = :id, location = :location WHERE slot = 1")
_COUNT_ROLLOUTS = sa.text("SELECT COUNT(*) FROM rollouts")


@dataclass(frozen=True, slots=True)
class RepositoryIdentity:
    """A repository as the store records it.

    Attributes:
        id: The id (``<hex>``, ``path:<dir>`` or ``url:<URL>``).
        location: Where it is (a directory or a URL), for messages.
    """

    id: str
    location: str

    def same_as(self, other: RepositoryIdentity) -> bool:
        """Whether both name one repository (by location when either has no id of its own)."""
        if self.id.startswith("path:") or other.id.startswith("path:"):
            return self.location == other.location
        return self.id == other.id


def repository_identity(repo: Path, url: str | None = None) -> RepositoryIdentity:
    """The identity of the repository at ``repo`` (its local copy, for a remote one at ``url``).

    A local repository's id file, written on first use if the directory is writable, else
    ``path:<directory>``; a repository in object storage is named by its URL.
    """
    if url is not None:
        return RepositoryIdentity(f"url:{url}", url)
    location = str(repo.resolve())
    found = layout.repository_id(repo)
    return RepositoryIdentity(found if found is not None else f"path:{location}", location)


@dataclass(frozen=True, slots=True)
class Binding:
    """The outcome of binding a store to a repository.

    Attributes:
        recorded: The repository the store describes now.
        adopted: Whether this call recorded it (the store had none).
        had_rollouts: With ``adopted``: whether the store already held rollout state,
            written before any repository was recorded.
    """

    recorded: RepositoryIdentity
    adopted: bool = False
    had_rollouts: bool = False


class RepositoryMismatch(ServiceError):
    """The store describes another repository than the one being served."""

    def __init__(self, recorded: RepositoryIdentity, current: RepositoryIdentity, store: str) -> None:
        super().__init__(
            f"the monitoring store {store} describes the repository {recorded.location} "
            f"(id {recorded.id}), not {current.location} (id {current.id}): its rollouts, RETIRED "
            f"versions and history would apply to the wrong versions. Give this repository its "
            f"own state (--state-dir DIR, or --store URL), or clear the old state (delete the "
            f"state directory, or the store's tables) to start over",
            ErrorCode.FAILED_PRECONDITION,
        )
        self.recorded = recorded
        self.current = current


def bind_repository(conn: Connection, current: RepositoryIdentity, now: float) -> Binding:
    """Records ``current`` if the store names no repository, else compares (one transaction).

    A ``path:`` identity recorded earlier is replaced by the id the same repository holds
    now, so it is compared by id from then on.

    Returns:
        The binding; ``recorded`` differs from ``current`` when :meth:`RepositoryIdentity.same_as`
        says it is another repository (the caller refuses it).
    """
    row = conn.execute(_SELECT).first()
    if row is None:
        had_rollouts = int(conn.execute(_COUNT_ROLLOUTS).scalar_one()) > 0
        inserted = conn.execute(_INSERT, {"id": current.id, "location": current.location, "bound": now})
        if inserted.rowcount == 1:
            return Binding(current, adopted=True, had_rollouts=had_rollouts)
        row = conn.execute(_SELECT).first()
        if row is None:  # pragma: no cover - the row cannot vanish inside the transaction
            return Binding(current)
    recorded = RepositoryIdentity(str(row[0]), str(row[1]))
    if recorded.same_as(current) and recorded.id.startswith("path:") and not current.id.startswith("path:"):
        conn.execute(_UPDATE, {"id": current.id, "location": current.location})
        return Binding(current)
    return Binding(recorded)


class BindingStore:
    """The ``repository`` table, on the shared engine.

    Args:
        engine: The database.
    """

    def __init__(self, engine: StoreEngine) -> None:
        self.engine = engine

    def bind_repository(self, current: RepositoryIdentity, now: float | None = None) -> Binding:
        """Records the repository the store describes, or checks that it is ``current``.

        Raises:
            RepositoryMismatch: The store describes another repository.
            StoreUnavailable: The database cannot be reached or written.
        """
        t = time.time() if now is None else now
        binding = self.engine.transaction(lambda conn: bind_repository(conn, current, t), write=True)
        if not binding.recorded.same_as(current):
            raise RepositoryMismatch(binding.recorded, current, self.engine.describe())
        return binding
