"""The prediction log and feedback store: SQLite (embedded default) or PostgreSQL (shared).

Every answered request is logged with its request id, model, version, time, a bounded
sample of its inputs, its outputs and its predicted classes or values. Feedback labels are
joined to those predictions by ``(model, request_id)``. A label is committed (and, on
SQLite, fsynced: WAL with ``synchronous=FULL``) before :meth:`PredictionStore.add_feedback`
returns, so a label acknowledged to a client survives ``kill -9``. The first label of a
prediction is final: a duplicate never overwrites it.

Both backends run the same SQL (``INSERT ... ON CONFLICT DO NOTHING`` is valid in SQLite
3.24+ and PostgreSQL 9.5+); only the driver, the placeholders and the transaction calls
differ. Every driver error becomes :class:`StoreUnavailable`.

Example:

```python
store = open_store("sqlite:///state/modelloop.db")
store.record([PredictionRecord("r1", "digits", 1, time.time(), [[0.0] * 64], [[0.1] * 10], [3])])
store.add_feedback("digits", [FeedbackItem("r1", [3])]).accepted  # ['r1']
store.close()
```
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson

from modelloop.errors import ErrorCode, ServiceError

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLASSIFIER_TASKS = frozenset({"multiclass", "binary"})
# SQLite's default limit on host parameters is 32766; PostgreSQL's is 65535.
_IN_CHUNK = 500

_SCHEMA = (
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
        PRIMARY KEY (model, request_id)
    )""",
    "CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created)",
    """CREATE TABLE IF NOT EXISTS feedback (
        model TEXT NOT NULL,
        request_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        n_labels INTEGER NOT NULL,
        targets TEXT NOT NULL,
        PRIMARY KEY (model, request_id)
    )""",
    "CREATE INDEX IF NOT EXISTS feedback_version ON feedback (model, version, created)",
)


class StoreUnavailable(ServiceError):
    """The store cannot be reached or written; the REST edge answers 503."""

    code = ErrorCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One logged request.

    Attributes:
        request_id: The id returned to the client in ``x-request-id``.
        model: Model name.
        version: The version that answered.
        created: Unix time of the answer.
        inputs: One list per row: the first ``sample_features`` input columns.
        outputs: One list per row: the model's first output.
        predicted: One predicted class id (classifiers) or value (regressors) per row.
        task: ``multiclass``, ``binary`` or ``regression``; decides what a valid target is.
        classes: Number of classes (0 for regressors); class ids run ``0..classes-1``.
    """

    request_id: str
    model: str
    version: int
    created: float
    inputs: list[list[float]]
    outputs: list[list[float]] | list[float]
    predicted: list[int | float]
    task: str = "multiclass"
    classes: int = 0


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """The labels of one request, one target per row, as the client sent them (unchecked)."""

    request_id: str
    targets: list[Any]


@dataclass(slots=True)
class FeedbackResult:
    """What :meth:`PredictionStore.add_feedback` did with each item.

    Attributes:
        accepted: Ids whose labels were stored now.
        unknown: Ids with no logged prediction of this model.
        duplicate: Ids already labelled (the first label is kept).
        invalid: Id -> why its targets were refused (count, type, class range).
        labels: Version -> labelled rows accepted now (for ``modelloop_feedback_total``).
    """

    accepted: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)
    labels: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer of the feedback route."""
        return {
            "accepted": self.accepted,
            "unknown": self.unknown,
            "duplicate": self.duplicate,
            "invalid": self.invalid,
        }


@dataclass(frozen=True, slots=True)
class LabelledRow:
    """One row with both a prediction and a label."""

    predicted: int | float
    target: int | float
    created: float


class PredictionStore(Protocol):
    """What monitoring and retraining need from a store; every method may raise
    :class:`StoreUnavailable`. Implementations are thread-safe."""

    def record(self, records: Sequence[PredictionRecord]) -> None:
        """Logs predictions; a repeated ``(model, request_id)`` keeps the first."""

    def add_feedback(self, model: str, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """Stores labels, durably, before it returns."""

    def recent_labelled(self, model: str, version: int, limit: int) -> list[LabelledRow]:
        """The most recent ``limit`` labelled rows of one version, newest first."""

    def count_labels(self, model: str, version: int) -> int:
        """Labelled rows of one version."""

    def feedback_dataset(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ``[n, features]`` and targets ``[n]`` of every labelled row, oldest first."""

    def prune(self, now: float | None = None) -> int:
        """Applies retention; returns the predictions deleted."""

    def close(self) -> None:
        """Releases the connection."""


def check_targets(targets: Any, rows: int, task: str, classes: int) -> tuple[list[int | float], str]:
    """Checks the targets of one prediction.

    Args:
        targets: What the client sent.
        rows: Rows of the logged prediction; one target is needed per row.
        task: ``multiclass``, ``binary`` or ``regression``.
        classes: Number of classes (0 = unknown or regression).

    Returns:
        ``(values, "")`` when valid (integral floats become ints for classifiers), else
        ``([], reason)``.
    """
    if not isinstance(targets, list):
        return [], "targets must be a list with one target per row"
    if len(targets) != rows:
        plural = "s" if rows != 1 else ""
        return [], f"expected {rows} target{plural} (one per row of the prediction), got {len(targets)}"
    values: list[int | float] = []
    for i, value in enumerate(targets):
        # bool is an int subclass in Python; a JSON true is no label.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [], f"target {i} is {type(value).__name__}, not a number"
        if isinstance(value, float) and not math.isfinite(value):
            return [], f"target {i} is not a finite number"
        if task in CLASSIFIER_TASKS:
            if isinstance(value, float) and not value.is_integer():
                return [], f"target {i} ({value}) is not a class id"
            cls = int(value)
            if cls < 0 or (classes > 0 and cls >= classes):
                upper = f"..{classes - 1}" if classes > 0 else " or more"
                return [], f"target {i} ({cls}) is outside the class ids 0{upper}"
            values.append(cls)
        else:
            values.append(float(value))
    return values, ""


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SqlPredictionStore:
    """The shared SQL of both backends; subclasses connect and map driver errors.

    Args:
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Predictions older than this are deleted. Defaults to 30.
    """

    placeholder = "?"
    backend = "sql"

    def __init__(self, *, retention_rows: int = 1_000_000, retention_days: float = 30.0) -> None:
        self.retention_rows = retention_rows
        self.retention_days = retention_days
        # One connection, one writer at a time: the observer thread, feedback calls and
        # the evaluator share it. SQLite serialises writers anyway.
        self._lock = threading.Lock()
        self._conn: Any = None
        self._closed = False

    # -- backend hooks ---------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        raise NotImplementedError
        yield  # pragma: no cover

    def _describe(self) -> str:
        return self.backend

    # -- plumbing --------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _run(self, work: Callable[[Any], T]) -> T:
        """Runs ``work(cursor)`` in one transaction; driver errors become StoreUnavailable."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"the {self._describe()} store is closed")
            try:
                if self._conn is None:
                    self._conn = self._connect()
                with self._transaction(self._conn) as cursor:
                    return work(cursor)
            except self._driver_errors() as exc:
                # Drop the connection: the next call reconnects (PostgreSQL restarts,
                # network blips) instead of reusing a broken session.
                self._discard()
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StoreUnavailable(f"{self._describe()}: {message}") from exc

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _create_schema(self, cursor: Any) -> None:
        for statement in _SCHEMA:
            cursor.execute(statement)

    # -- the store -------------------------------------------------------------------

    def record(self, records: Sequence[PredictionRecord]) -> None:
        """Logs predictions in one transaction.

        Args:
            records: The predictions; a repeated ``(model, request_id)`` keeps the first.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        if not records:
            return
        sql = self._sql(
            "INSERT INTO predictions (model, request_id, version, created, task, classes, n_rows, "
            "inputs, outputs, predicted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (model, request_id) DO NOTHING"
        )
        rows = [
            (
                r.model,
                r.request_id,
                r.version,
                r.created,
                r.task,
                r.classes,
                len(r.predicted),
                _dumps(r.inputs),
                _dumps(r.outputs),
                _dumps(r.predicted),
            )
            for r in records
        ]
        self._run(lambda cur: cur.executemany(sql, rows))

    def add_feedback(self, model: str, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """Joins labels to logged predictions and stores the valid ones, durably.

        Args:
            model: The model named in the route.
            items: One item per request id.

        Returns:
            What happened to each id; an id repeated within ``items`` after being accepted
            counts as a duplicate.

        Raises:
            StoreUnavailable: The database cannot be reached; nothing was stored.
        """
        ids = list(dict.fromkeys(item.request_id for item in items))

        def work(cur: Any) -> FeedbackResult:
            known: dict[str, tuple[int, str, int, int]] = {}
            labelled: set[str] = set()
            for chunk in _chunks(ids):
                marks = ", ".join("?" * len(chunk))
                cur.execute(
                    self._sql(
                        "SELECT request_id, version, task, classes, n_rows FROM predictions "
                        f"WHERE model = ? AND request_id IN ({marks})"
                    ),
                    (model, *chunk),
                )
                for rid, version, task, classes, n_rows in cur.fetchall():
                    known[rid] = (int(version), str(task), int(classes), int(n_rows))
                cur.execute(
                    self._sql(f"SELECT request_id FROM feedback WHERE model = ? AND request_id IN ({marks})"),
                    (model, *chunk),
                )
                labelled.update(row[0] for row in cur.fetchall())
            result = FeedbackResult()
            labels: dict[int, int] = defaultdict(int)
            insert = self._sql(
                "INSERT INTO feedback (model, request_id, version, created, n_labels, targets) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model, request_id) DO NOTHING"
            )
            now = time.time()
            for item in items:
                rid = item.request_id
                if rid in labelled:
                    result.duplicate.append(rid)
                    continue
                if rid not in known:
                    if rid not in result.unknown:
                        result.unknown.append(rid)
                    continue
                version, task, classes, n_rows = known[rid]
                values, problem = check_targets(item.targets, n_rows, task, classes)
                if problem:
                    result.invalid[rid] = problem
                    continue
                cur.execute(insert, (model, rid, version, now, len(values), _dumps(values)))
                if cur.rowcount == 0:  # another replica labelled it since the SELECT
                    result.duplicate.append(rid)
                else:
                    result.accepted.append(rid)
                    labels[version] += len(values)
                labelled.add(rid)
            result.labels = dict(labels)
            return result

        return self._run(work)

    def recent_labelled(self, model: str, version: int, limit: int) -> list[LabelledRow]:
        """The newest ``limit`` labelled rows of one version, newest first.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        sql = self._sql(
            "SELECT p.predicted, f.targets, f.created FROM feedback f JOIN predictions p "
            "ON p.model = f.model AND p.request_id = f.request_id "
            "WHERE f.model = ? AND f.version = ? ORDER BY f.created DESC LIMIT ?"
        )

        def work(cur: Any) -> list[Any]:
            # Each request has at least one row, so `limit` requests cover `limit` rows.
            cur.execute(sql, (model, version, limit))
            return list(cur.fetchall())

        rows: list[LabelledRow] = []
        for predicted, targets, created in self._run(work):
            for p, t in zip(orjson.loads(predicted), orjson.loads(targets), strict=False):
                rows.append(LabelledRow(p, t, float(created)))
                if len(rows) >= limit:
                    return rows
        return rows

    def count_labels(self, model: str, version: int) -> int:
        """Labelled rows of one version.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        sql = self._sql("SELECT COALESCE(SUM(n_labels), 0) FROM feedback WHERE model = ? AND version = ?")

        def work(cur: Any) -> int:
            cur.execute(sql, (model, version))
            return int(cur.fetchone()[0])

        return self._run(work)

    def feedback_dataset(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of every labelled row of a model, oldest first, for retraining.

        Inputs are the logged columns (the first ``sample_features``); rows whose width
        differs from the most recent label's (an older model with other inputs) are left out.

        Returns:
            ``(x, y)``: float32 ``[n, features]`` and ``[n]`` (int64 for classifiers,
            float32 for regressors); ``[0, 0]`` and ``[0]`` when there are no labels.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        sql = self._sql(
            "SELECT p.inputs, f.targets, p.task FROM feedback f JOIN predictions p "
            "ON p.model = f.model AND p.request_id = f.request_id "
            "WHERE f.model = ? ORDER BY f.created, f.request_id"
        )

        def work(cur: Any) -> list[Any]:
            cur.execute(sql, (model,))
            return list(cur.fetchall())

        fetched = self._run(work)
        xs: list[list[float]] = []
        ys: list[int | float] = []
        classifier = True
        for inputs, targets, task in fetched:
            rows, values = orjson.loads(inputs), orjson.loads(targets)
            if len(rows) != len(values):
                continue
            xs.extend(rows)
            ys.extend(values)
            classifier = task in CLASSIFIER_TASKS
        if not xs:
            return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64 if classifier else np.float32)
        width = len(xs[-1])
        keep = [i for i, row in enumerate(xs) if len(row) == width]
        x = np.asarray([xs[i] for i in keep], dtype=np.float32)
        y = np.asarray([ys[i] for i in keep], dtype=np.int64 if classifier else np.float32)
        return x, y

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

        def work(cur: Any) -> int:
            cur.execute(self._sql("DELETE FROM predictions WHERE created < ?"), (cutoff,))
            deleted = max(cur.rowcount, 0)
            cur.execute(
                self._sql("SELECT created FROM predictions ORDER BY created DESC LIMIT 1 OFFSET ?"),
                (self.retention_rows,),
            )
            row = cur.fetchone()
            if row is not None:
                # `<=`: the row at the offset is the first one beyond the bound.
                cur.execute(self._sql("DELETE FROM predictions WHERE created <= ?"), (row[0],))
                deleted += max(cur.rowcount, 0)
            if deleted:
                cur.execute(
                    "DELETE FROM feedback WHERE NOT EXISTS (SELECT 1 FROM predictions p "
                    "WHERE p.model = feedback.model AND p.request_id = feedback.request_id)"
                )
            return deleted

        return self._run(work)

    def close(self) -> None:
        """Closes the connection; later calls raise :class:`StoreUnavailable`."""
        with self._lock:
            self._closed = True
            self._discard()


class SQLitePredictionStore(SqlPredictionStore):
    """The embedded store: one SQLite file in WAL mode with ``synchronous=FULL``.

    WAL lets the evaluator read while the observer writes; ``synchronous=FULL`` fsyncs
    the WAL at every commit, which is what makes an acknowledged label survive a crash.

    Args:
        path: The database file; its directory is created.
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Age bound in days. Defaults to 30.

    Raises:
        StoreUnavailable: The file cannot be created or opened.
    """

    backend = "sqlite"

    def __init__(self, path: Path, *, retention_rows: int = 1_000_000, retention_days: float = 30.0) -> None:
        super().__init__(retention_rows=retention_rows, retention_days=retention_days)
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"sqlite: cannot create {self.path.parent}: {exc.strerror}") from exc
        self._run(self._create_schema)

    def _describe(self) -> str:
        return f"sqlite {self.path}"

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        cursor = conn.cursor()
        # IMMEDIATE takes the write lock up front, so two processes never deadlock on
        # an upgrade from a read to a write lock.
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")


class PostgresPredictionStore(SqlPredictionStore):
    """The shared store for several replicas, through psycopg 3.

    It connects lazily and reconnects after a failure, so a server starts while the
    database is down and recovers when it returns; meanwhile calls raise
    :class:`StoreUnavailable`. Commits are durable with PostgreSQL's default
    ``synchronous_commit=on``.

    Args:
        url: A libpq URL, ``postgresql://user:pass@host:port/db``.
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Age bound in days. Defaults to 30.
        connect_timeout_s: Seconds to wait for a connection. Defaults to 5.
    """

    placeholder = "%s"
    backend = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        retention_rows: int = 1_000_000,
        retention_days: float = 30.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(retention_rows=retention_rows, retention_days=retention_days)
        try:
            import psycopg
        except ImportError as exc:  # the [postgres] extra is not installed
            raise StoreUnavailable(
                "postgresql store needs psycopg: pip install 'modelloop[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._schema_ready = False

    def _describe(self) -> str:
        # Never echo the password in errors.
        info = self._psycopg.conninfo.conninfo_to_dict(self.url)
        return f"postgresql {info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _connect(self) -> Any:
        # autocommit: every transaction() block is a real BEGIN ... COMMIT, not a savepoint.
        conn = self._psycopg.connect(
            self.url, connect_timeout=max(1, int(self.connect_timeout_s)), autocommit=True
        )
        if not self._schema_ready:
            with conn.transaction(), conn.cursor() as cur:
                # Replicas may start together; the advisory lock serialises CREATE IF NOT EXISTS,
                # which is not race-free on PostgreSQL's catalogs.
                cur.execute("SELECT pg_advisory_xact_lock(7283740001)")
                self._create_schema(cur)
            self._schema_ready = True
        return conn

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        with conn.transaction(), conn.cursor() as cursor:
            yield cursor


def open_store(url: str, *, retention_rows: int = 1_000_000, retention_days: float = 30.0) -> PredictionStore:
    """Opens the store a URL names.

    Args:
        url: ``sqlite:///relative/or/absolute/path.db`` (four slashes for an absolute path)
            or ``postgresql://...`` (``postgres://`` too).
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Age bound in days. Defaults to 30.

    Returns:
        The store.

    Raises:
        StoreUnavailable: An unknown scheme, or a SQLite file that cannot be opened.
    """
    if url.startswith("sqlite:///"):
        return SQLitePredictionStore(
            Path(url.removeprefix("sqlite:///")), retention_rows=retention_rows, retention_days=retention_days
        )
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresPredictionStore(url, retention_rows=retention_rows, retention_days=retention_days)
    raise StoreUnavailable(f"unknown store URL {url!r}: use sqlite:///path or postgresql://...")
