"""The engine every store shares: one SQLAlchemy engine and pool per database, SQLite or PostgreSQL.

Each kind of stored data (predictions, feedback, history, retrain reports, rollouts, the
repository binding, the prediction log) has a small store of its own in this package, with
its own SQL; they all run it in :meth:`StoreEngine.transaction`, so they share the pooling,
the SQLite locking and the error mapping below. The tables are created (and a database
written by an older version upgraded in place) on the first call that reaches the database,
under a lock, by the schema function the engine is given (:mod:`.schema`).

Both backends run the same SQL through SQLAlchemy Core (no ORM): every statement is a
``sqlalchemy.text()`` with named bind parameters (``:model``), and the ``IN (...)`` lists
are expanding bind parameters, so SQLAlchemy renders each driver's placeholders.
``INSERT ... ON CONFLICT DO NOTHING`` is valid in SQLite 3.24+ and PostgreSQL 9.5+.

* SQLite: a pool of connections to one file, each set to WAL, ``synchronous=FULL`` and a
  busy timeout when it is opened. Transactions are explicit: a write begins with
  ``BEGIN IMMEDIATE``, a read with a plain (deferred) ``BEGIN``, so readers run beside the
  one writer.
* PostgreSQL: a bounded ``QueuePool`` of psycopg 3 connections, opened lazily and checked
  with a ping before use, so a server starts while the database is down and recovers by
  itself when it returns.

Every driver or pool error becomes :class:`StoreUnavailable`, with a one-line message that
never contains the password. The engine is thread-safe: each call checks out its own pooled
connection for one transaction.

Example:

```python
engine = open_engine("sqlite:///state/modelloop.db", schema=create_schema)
engine.transaction(lambda conn: conn.execute(sa.text("SELECT 1")).scalar_one(), write=False)  # 1
engine.close()
```
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from modelloop.errors import ErrorCode, ServiceError

T = TypeVar("T")

Schema = Callable[[Connection], None]
"""Creates (or upgrades) the tables, in the transaction it is given."""

# SQLite's default limit on host parameters is 32766; PostgreSQL's is 65535. An expanding
# bind parameter still sends one parameter per id, so long id lists go in chunks.
_IN_CHUNK = 500
# Connections per engine: enough for the observer, the evaluator and a few concurrent
# feedback calls; bounded so that N replicas cannot exhaust PostgreSQL's max_connections.
_POOL_SIZE = 5
_MAX_OVERFLOW = 5
# Seconds a SQLite writer waits for another process's write lock before failing.
_SQLITE_BUSY_TIMEOUT_S = 10.0
# Seconds close() waits for calls in flight before it closes the pool anyway.
_CLOSE_WAIT_S = 10.0
# Execution option that tells the SQLite "begin" hook which BEGIN to emit.
_WRITE_OPTION = "modelloop_write"
# Key of the advisory lock that serialises schema creation across PostgreSQL replicas.
_SCHEMA_LOCK_KEY = 7283740001
_SCHEMA_LOCK = sa.text("SELECT pg_advisory_xact_lock(:key)")


class StoreUnavailable(ServiceError):
    """The store cannot be reached or written; the REST edge answers 503."""

    code = ErrorCode.UNAVAILABLE


def dumps(value: Any) -> str:
    """JSON text of a value (numpy arrays included), as the stores keep it."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices short enough for one expanding ``IN`` list."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _first_line(exc: BaseException) -> str:
    """The first line of what went wrong, without SQLAlchemy's SQL echo and help link."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        # The driver's own message; str(exc) would add the statement and a URL.
        text = str(exc.orig)
    elif isinstance(exc, SQLAlchemyError):
        text = str(exc.args[0]) if exc.args else ""
    else:
        text = str(exc)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class StoreEngine:
    """One SQLAlchemy engine per database, shared by every store of this package.

    Subclasses build the engine (``self._engine``) and may override the hooks below; this
    class runs every call as one transaction on a connection checked out of the engine's
    pool, so calls from several threads run side by side, and turns every driver or pool
    error into :class:`StoreUnavailable`. The schema is created on the first call that
    reaches the database, so an engine can be opened while its database is down.

    Args:
        schema: Creates or upgrades the tables, once, in one transaction.
    """

    backend = "sql"
    _engine: Engine

    def __init__(self, *, schema: Schema) -> None:
        self._schema = schema
        # The gate guards `_closed` and counts the calls in flight, so that close() can
        # wait for them before it closes the pool under their feet.
        self._gate = threading.Condition()
        self._active = 0
        self._closed = False
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    # -- backend hooks ---------------------------------------------------------------

    def describe(self) -> str:
        """Names the database in messages; never includes a password."""
        return self.backend

    @property
    def placeholder(self) -> str:
        """The driver's own placeholder, for statements sent with ``exec_driver_sql``."""
        # sqlite3 takes "?" (qmark); psycopg takes "%s" (format and pyformat).
        return "?" if self._engine.dialect.paramstyle == "qmark" else "%s"

    def redact(self, message: str) -> str:
        """Removes secrets from a driver message; the base class has none to remove."""
        return message

    def _writer(self, write: bool) -> contextlib.AbstractContextManager[Any]:
        """What a transaction holds besides its connection; nothing by default."""
        return contextlib.nullcontext()

    def _lock_schema(self, conn: Connection) -> None:
        """Serialises schema creation with other processes; SQLite's write lock does."""

    # -- plumbing --------------------------------------------------------------------

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        """Turns driver and pool errors into StoreUnavailable with a one-line message."""
        try:
            yield
        except (SQLAlchemyError, sqlite3.Error) as exc:
            # sqlite3.Error: raised by the "connect" hook, outside SQLAlchemy's wrapping.
            message = self.redact(_first_line(exc))
            raise StoreUnavailable(f"{self.describe()}: {message}") from exc

    def _ensure_schema(self) -> None:
        """Creates the tables once per engine; retried on the next call if it fails."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            with self._unavailable_on_error(), self._writer(True), self._engine.begin() as conn:
                self._lock_schema(conn)
                self._schema(conn)
            self._schema_ready = True

    @property
    def dialect(self) -> str:
        """The database: ``sqlite`` or ``postgresql``."""
        return str(self._engine.dialect.name)

    def transaction(self, work: Callable[[Connection], T], *, write: bool) -> T:
        """Runs ``work(connection)`` in one transaction, committed before it returns.

        Args:
            work: The statements; it must not commit or roll back itself.
            write: Whether ``work`` writes; SQLite then takes its write lock up front.

        Raises:
            StoreUnavailable: The engine is closed, or the database failed; the
                transaction was rolled back.
        """
        with self._gate:
            if self._closed:
                raise StoreUnavailable(f"the {self.describe()} store is closed")
            self._active += 1
        try:
            self._ensure_schema()
            with self._unavailable_on_error(), self._writer(write), self._engine.connect() as conn:
                # Read by the SQLite "begin" hook; PostgreSQL ignores it.
                conn.execution_options(**{_WRITE_OPTION: write})
                with conn.begin():
                    return work(conn)
        finally:
            with self._gate:
                self._active -= 1
                if self._active == 0:
                    self._gate.notify_all()

    def close(self) -> None:
        """Closes the pool's connections; later calls raise :class:`StoreUnavailable`.

        Calls in flight may finish first: close() waits up to 10 seconds for them.
        """
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._gate.wait_for(lambda: self._active == 0, timeout=_CLOSE_WAIT_S)
        with contextlib.suppress(Exception):
            self._engine.dispose()


class SQLiteEngine(StoreEngine):
    """The embedded database: one SQLite file in WAL mode with ``synchronous=FULL``.

    WAL lets the evaluator read while the observer writes; ``synchronous=FULL`` fsyncs
    the WAL at every commit, which is what makes an acknowledged label survive a crash.
    Each pooled connection gets both settings, and a busy timeout, when it is opened (the
    engine's "connect" hook). Transactions follow SQLAlchemy's pysqlite recipe: the
    driver's own implicit BEGIN is off (``isolation_level=None``) and the engine's "begin"
    hook emits ``BEGIN IMMEDIATE`` for writes, which takes the write lock up front so two
    processes never deadlock on an upgrade from a read to a write lock, and a deferred
    ``BEGIN`` for reads, which see one snapshot without blocking the writer. Writers of
    this process queue on a lock rather than in SQLite's busy handler, which polls.

    Args:
        path: The database file; its directory is created.
        schema: Creates or upgrades the tables (at once: a file that cannot be opened fails here).

    Raises:
        StoreUnavailable: The file cannot be created or opened.
    """

    backend = "sqlite"

    def __init__(self, path: Path, *, schema: Schema) -> None:
        super().__init__(schema=schema)
        self.path = Path(path)
        self._write_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"sqlite: cannot create {self.path.parent}: {exc.strerror}") from exc
        self._engine = sa.create_engine(
            sa.URL.create("sqlite", database=str(self.path)),
            connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S},
            pool_size=_POOL_SIZE,
            max_overflow=_MAX_OVERFLOW,
            pool_timeout=_SQLITE_BUSY_TIMEOUT_S,
            hide_parameters=True,
        )
        event.listen(self._engine, "connect", _sqlite_on_connect)
        event.listen(self._engine, "begin", _sqlite_on_begin)
        # Unlike PostgreSQL, a file that cannot be opened is a configuration error: fail
        # at startup, not at the first request.
        try:
            self._ensure_schema()
        except StoreUnavailable:
            self._engine.dispose()
            raise

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def _writer(self, write: bool) -> contextlib.AbstractContextManager[Any]:
        return self._write_lock if write else contextlib.nullcontext()


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    """Sets up each new SQLite connection of the pool (the "connect" pool event)."""
    # isolation_level=None: the driver emits no BEGIN of its own; _sqlite_on_begin does.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # The busy timeout first: several worker processes open the file at once, and
        # switching it to WAL waits for the others' locks like any other statement.
        cursor.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """Sets WAL mode, retrying while another process holds the file's lock.

    Two processes that open a new file together (the workers of ``serve --workers N``)
    both switch it from the rollback journal to WAL. That takes an exclusive lock, and
    SQLite answers "database is locked" at once, without its busy handler, when waiting
    could deadlock two connections that both hold a shared lock; so the wait is here.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)


def _sqlite_on_begin(conn: Connection) -> None:
    """Emits the BEGIN of each transaction (the "begin" connection event)."""
    write = conn.get_execution_options().get(_WRITE_OPTION, True)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class PostgresEngine(StoreEngine):
    """The database several replicas share, through psycopg 3 and a connection pool.

    The engine's ``QueuePool`` opens connections lazily (at most 5 kept, 5 more under
    load) and pings each one before use (``pool_pre_ping``), replacing it and the rest of
    the pool after a server restart. So a server starts while the database is down and
    recovers by itself when it returns; meanwhile calls raise :class:`StoreUnavailable`.
    Replicas that start together create the schema one at a time, under an advisory lock.
    Commits are durable with PostgreSQL's default ``synchronous_commit=on``.

    Args:
        url: A libpq URL, ``postgresql://user:pass@host:port/db`` (``postgres://`` too);
            it is opened with SQLAlchemy's ``postgresql+psycopg`` dialect.
        schema: Creates or upgrades the tables, on the first call that reaches the database.
        connect_timeout_s: Seconds to wait for a new connection, and for a free one when
            the pool is exhausted. Defaults to 5.

    Raises:
        StoreUnavailable: The URL cannot be parsed, or psycopg is not installed.
    """

    backend = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        schema: Schema,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(schema=schema)
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            # Not the URL itself in the message: it may hold a password.
            raise StoreUnavailable("postgresql: the store URL cannot be parsed") from exc
        if parsed.get_backend_name() not in ("postgresql", "postgres"):
            raise StoreUnavailable(f"postgresql: not a PostgreSQL URL ({parsed.drivername}://...)")
        self._url = parsed.set(drivername="postgresql+psycopg")
        self._password = self._url.password or ""
        try:
            self._engine = sa.create_engine(
                self._url,
                # libpq takes whole seconds.
                connect_args={"connect_timeout": max(1, int(connect_timeout_s))},
                pool_size=_POOL_SIZE,
                max_overflow=_MAX_OVERFLOW,
                pool_timeout=connect_timeout_s,
                pool_pre_ping=True,
                hide_parameters=True,
            )
        except ImportError as exc:  # the [postgres] extra is not installed
            raise StoreUnavailable(
                "postgresql store needs psycopg: pip install 'modelloop[postgres]'"
            ) from exc

    def describe(self) -> str:
        # Host, port and database only: never echo the password. A socket directory may
        # come as ?host=... instead of in the authority.
        host = self._url.host or self._url.query.get("host") or "localhost"
        if not isinstance(host, str):  # ?host=a&host=b: libpq's multi-host form
            host = ",".join(host)
        return f"postgresql {host}:{self._url.port or 5432}/{self._url.database or ''}"

    def redact(self, message: str) -> str:
        # libpq does not echo passwords; this is a second line of defence.
        return message.replace(self._password, "***") if self._password else message

    def _lock_schema(self, conn: Connection) -> None:
        # Replicas may start together; the advisory lock serialises CREATE IF NOT EXISTS,
        # which is not race-free on PostgreSQL's catalogs. It is released at commit.
        conn.execute(_SCHEMA_LOCK, {"key": _SCHEMA_LOCK_KEY})


def open_engine(url: str, *, schema: Schema) -> StoreEngine:
    """Opens the engine of the database a URL names.

    Args:
        url: ``sqlite:///relative/or/absolute/path.db`` (four slashes for an absolute path)
            or ``postgresql://...`` (``postgres://`` too).
        schema: Creates or upgrades the tables (see :func:`.schema.create_schema`).

    Returns:
        The engine.

    Raises:
        StoreUnavailable: An unknown scheme, or a SQLite file that cannot be opened.
    """
    if url.startswith("sqlite:///"):
        return SQLiteEngine(Path(url.removeprefix("sqlite:///")), schema=schema)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(url, schema=schema)
    # The scheme only: the rest of a URL may hold a password.
    scheme = url.split("://", 1)[0] if "://" in url else url[:20]
    raise StoreUnavailable(f"unknown store URL scheme {scheme!r}: use sqlite:///path or postgresql://...")
