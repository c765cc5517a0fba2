"""The prediction log and feedback store: SQLite (embedded default) or PostgreSQL (shared).

Every answered request is logged with its request id, model, version, time, a bounded
sample of its inputs, its outputs and its predicted classes or values. Feedback labels are
joined to those predictions by ``(model, request_id)``. A label is committed (and, on
SQLite, fsynced: WAL with ``synchronous=FULL``) before :meth:`PredictionStore.add_feedback`
returns, so a label acknowledged to a client survives ``kill -9``. Each source labels a
prediction once (a duplicate never overwrites its first label), and several sources'
labels of one prediction are all kept; accuracy counts the first trusted one. A request id
that answered two different inputs is ambiguous: both are logged, and no label joins them.

Each label keeps its source (the labeler its token named, ``anonymous`` without
authentication) and whether that source was quarantined when the label arrived. In the
same transaction the store counts, per source, which class the champion predicted, with
what confidence, and which class the label named (``feedback_stats``): the per-source
agreement and confusion that the label checks read. Those counts outlive retention, so a
source's history is not forgotten when old predictions are pruned. The retrain gate's
reports are kept in ``retrain_reports``.

A database written by an older version is upgraded when the store first reaches it: the
missing ``source`` and ``quarantined`` columns are added (old labels become
``anonymous``) and the counts are built from the labels already there.

Both backends run the same SQL through SQLAlchemy Core (no ORM): every statement is a
``sqlalchemy.text()`` with named bind parameters (``:model``), and the ``IN (...)`` lists
are expanding bind parameters, so SQLAlchemy renders each driver's placeholders.
``INSERT ... ON CONFLICT DO NOTHING`` is valid in SQLite 3.24+ and PostgreSQL 9.5+. Each
store owns one :class:`sqlalchemy.engine.Engine` and its connection pool:

* SQLite: a pool of connections to one file, each set to WAL, ``synchronous=FULL`` and a
  busy timeout when it is opened. Transactions are explicit: a write begins with
  ``BEGIN IMMEDIATE``, a read with a plain (deferred) ``BEGIN``, so readers run beside the
  one writer.
* PostgreSQL: a bounded ``QueuePool`` of psycopg 3 connections, opened lazily and checked
  with a ping before use, so a server starts while the database is down and recovers by
  itself when it returns.

Every driver or pool error becomes :class:`StoreUnavailable`, with a one-line message that
never contains the password. Stores are thread-safe: each call checks out its own pooled
connection for one transaction.

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
import random
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from modelloop.errors import ErrorCode, ServiceError
from modelloop.monitoring import history as _history
from modelloop.monitoring.binding import (
    BINDING_SCHEMA,
    Binding,
    RepositoryIdentity,
    RepositoryMismatch,
    bind_repository,
)
from modelloop.monitoring.history import HISTORY_SCHEMA, HistoryPoint
from modelloop.monitoring.rollout_store import (
    ROLLOUT_SCHEMA,
    RolloutDoc,
    RolloutTraffic,
    add_rollout_traffic,
    delete_rollout,
    read_predicted,
    read_rollout_traffic,
    read_rollouts,
    save_rollout,
)
from modelloop.tokens import ANONYMOUS_SOURCE

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLASSIFIER_TASKS = frozenset({"multiclass", "binary"})
# SQLite's default limit on host parameters is 32766; PostgreSQL's is 65535. An expanding
# bind parameter still sends one parameter per id, so long id lists go in chunks.
_IN_CHUNK = 500
# Connections per store: enough for the observer, the evaluator and a few concurrent
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

# The feedback table keeps one label per (prediction, source); older databases kept one per
# prediction and are rebuilt with the wider key (their rows all fit it).
_FEEDBACK_COLUMNS = "model, request_id, version, created, n_labels, targets, source, quarantined"
_FEEDBACK_TABLE = """CREATE TABLE {name} (
        model TEXT NOT NULL,
        request_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        n_labels INTEGER NOT NULL,
        targets TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT 'anonymous',
        quarantined INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (model, request_id, source)
    )"""

_SCHEMA = tuple(
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
        _FEEDBACK_TABLE.format(name="IF NOT EXISTS feedback"),
        "CREATE INDEX IF NOT EXISTS feedback_version ON feedback (model, version, created)",
    )
)
# Columns added since the first schema: (table, column, definition). An older database
# gets them with ALTER TABLE; the defaults describe the rows it already holds.
_ADDED_COLUMNS = (
    ("feedback", "source", "TEXT NOT NULL DEFAULT 'anonymous'"),
    ("feedback", "quarantined", "INTEGER NOT NULL DEFAULT 0"),
    # A digest of the request's input rows: a repeated id with the same input is a retry,
    # with another input the id is ambiguous and its labels are refused.
    ("predictions", "input_hash", "TEXT NOT NULL DEFAULT ''"),
    ("predictions", "ambiguous", "INTEGER NOT NULL DEFAULT 0"),
)
_STATS_TABLE = "feedback_stats"
_SCHEMA_AFTER_COLUMNS = tuple(
    sa.text(statement)
    for statement in (
        "CREATE INDEX IF NOT EXISTS feedback_source ON feedback (model, source)",
        # One row per (version, source, predicted class, label, confidence in percent):
        # a few hundred rows per source, whatever the traffic.
        f"""CREATE TABLE IF NOT EXISTS {_STATS_TABLE} (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        source TEXT NOT NULL,
        predicted INTEGER NOT NULL,
        target INTEGER NOT NULL,
        confidence INTEGER NOT NULL,
        labels INTEGER NOT NULL,
        PRIMARY KEY (model, version, source, predicted, target, confidence)
    )""",
        """CREATE TABLE IF NOT EXISTS retrain_reports (
        model TEXT NOT NULL,
        run_id TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        outcome TEXT NOT NULL,
        report TEXT NOT NULL,
        PRIMARY KEY (model, run_id)
    )""",
    )
)

# The prediction insert goes to the driver directly (``exec_driver_sql``): the log takes
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
_SELECT_PREDICTED = sa.text(
    "SELECT request_id, version, task, classes, n_rows, predicted, outputs, ambiguous FROM predictions "
    "WHERE model = :model AND request_id IN :ids"
).bindparams(sa.bindparam("ids", expanding=True))
_SELECT_LABELLED = sa.text(
    "SELECT request_id, source, targets FROM feedback WHERE model = :model AND request_id IN :ids"
).bindparams(sa.bindparam("ids", expanding=True))
_INSERT_FEEDBACK = sa.text(
    "INSERT INTO feedback (model, request_id, version, created, n_labels, targets, source, quarantined) "
    "VALUES (:model, :request_id, :version, :created, :n_labels, :targets, :source, :quarantined) "
    "ON CONFLICT (model, request_id, source) DO NOTHING"
)
_ADD_STATS = sa.text(
    f"INSERT INTO {_STATS_TABLE} (model, version, source, predicted, target, confidence, labels) "
    "VALUES (:model, :version, :source, :predicted, :target, :confidence, :labels) "
    "ON CONFLICT (model, version, source, predicted, target, confidence) "
    f"DO UPDATE SET labels = {_STATS_TABLE}.labels + excluded.labels"
)
_SELECT_STATS = sa.text(
    f"SELECT version, source, predicted, target, confidence, labels FROM {_STATS_TABLE} WHERE model = :model"
)
_SELECT_ALL_LABELLED = sa.text(
    "SELECT f.model, f.version, f.source, f.targets, p.task, p.predicted, p.outputs "
    "FROM feedback f JOIN predictions p ON p.model = f.model AND p.request_id = f.request_id "
    "WHERE p.ambiguous = 0"
)
_SELECT_SOURCES = sa.text(
    "SELECT source, COUNT(*), COALESCE(SUM(n_labels), 0), "
    "COALESCE(SUM(CASE WHEN quarantined = 1 THEN n_labels ELSE 0 END), 0) "
    "FROM feedback WHERE model = :model GROUP BY source"
)
# Accuracy takes one label per prediction: the first from a trusted source (several
# labelers may label one prediction; a quarantined one never shuts the others out).
_RANKED_LABELS = (
    "SELECT model, request_id, version, created, targets, source, "
    "ROW_NUMBER() OVER (PARTITION BY model, request_id ORDER BY created, source) AS rank "
    "FROM feedback WHERE model = :model {trusted}"
)
_SELECT_RECENT = sa.text(
    "SELECT p.predicted, f.targets, f.created FROM ("
    + _RANKED_LABELS.format(trusted="")
    + ") f JOIN predictions p ON p.model = f.model AND p.request_id = f.request_id "
    "WHERE f.rank = 1 AND f.version = :version AND p.ambiguous = 0 ORDER BY f.created DESC LIMIT :limit"
)
_SELECT_RECENT_TRUSTED = sa.text(
    "SELECT p.predicted, f.targets, f.created FROM ("
    + _RANKED_LABELS.format(trusted="AND source NOT IN :excluded")
    + ") f JOIN predictions p ON p.model = f.model AND p.request_id = f.request_id "
    "WHERE f.rank = 1 AND f.version = :version AND p.ambiguous = 0 ORDER BY f.created DESC LIMIT :limit"
).bindparams(sa.bindparam("excluded", expanding=True))
_INSERT_REPORT = sa.text(
    "INSERT INTO retrain_reports (model, run_id, created, outcome, report) "
    "VALUES (:model, :run_id, :created, :outcome, :report) ON CONFLICT (model, run_id) DO NOTHING"
)
_SELECT_REPORTS = sa.text(
    "SELECT report FROM retrain_reports WHERE model = :model ORDER BY created DESC LIMIT :limit"
)
_COUNT_TRUSTED_SINCE = sa.text(
    "SELECT COALESCE(SUM(n_labels), 0) FROM feedback "
    "WHERE model = :model AND created > :since AND quarantined = 0 AND source NOT IN :excluded"
).bindparams(sa.bindparam("excluded", expanding=True))
_LAST_REPORT = sa.text("SELECT MAX(created) FROM retrain_reports WHERE model = :model")
_COUNT_LABELS = sa.text(
    "SELECT COALESCE(SUM(n_labels), 0) FROM feedback WHERE model = :model AND version = :version"
)
_SELECT_DATASET = sa.text(
    "SELECT p.inputs, f.targets, p.task, f.source, f.request_id FROM feedback f JOIN predictions p "
    "ON p.model = f.model AND p.request_id = f.request_id "
    "WHERE f.model = :model AND p.ambiguous = 0 ORDER BY f.created, f.request_id, f.source"
)
_DELETE_OLDER = sa.text("DELETE FROM predictions WHERE created < :cutoff")
_NTH_NEWEST = sa.text("SELECT created FROM predictions ORDER BY created DESC LIMIT 1 OFFSET :offset")
_DELETE_UP_TO = sa.text("DELETE FROM predictions WHERE created <= :created")
_DELETE_ORPHAN_FEEDBACK = sa.text(
    "DELETE FROM feedback WHERE NOT EXISTS (SELECT 1 FROM predictions p "
    "WHERE p.model = feedback.model AND p.request_id = feedback.request_id)"
)
_SCHEMA_LOCK = sa.text("SELECT pg_advisory_xact_lock(:key)")


AMBIGUOUS_ID = (
    "this request id answered requests with different inputs, so a label cannot tell which one it "
    "belongs to; give every request its own id (a retry may reuse it with the same input)"
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
        inputs: One list per row: the first ``sample_features`` input columns (a list, or a
            2-D array that is logged as the same JSON).
        outputs: One list per row: the model's first output (list or array).
        predicted: One predicted class id (classifiers) or value (regressors) per row.
        task: ``multiclass``, ``binary`` or ``regression``; decides what a valid target is.
        classes: Number of classes (0 for regressors); class ids run ``0..classes-1``.
    """

    request_id: str
    model: str
    version: int
    created: float
    inputs: list[list[float]] | np.ndarray
    outputs: list[list[float]] | list[float] | np.ndarray
    predicted: list[int | float] | np.ndarray
    task: str = "multiclass"
    classes: int = 0
    input_hash: str = ""
    """A digest of the request's whole input rows ("" = unknown: never ambiguous)."""


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
        duplicate: Ids this source already labelled (its first label is kept; other
            sources' labels of the same prediction are kept beside it).
        ambiguous: Id -> why its labels were refused: the id answered requests with
            different inputs, so no label can be paired with one of them.
        invalid: Id -> why its targets were refused (count, type, class range).
        labels: Version -> labelled rows accepted now.
        source: The labeler source the labels were stored under.
        quarantined: Whether that source was quarantined: its labels are stored and
            marked, and the label checks leave them out.
        rows: ``(version, outcome)`` -> rows, for ``modelloop_feedback_total``: outcome
            ``accepted`` or ``quarantined`` for stored labels, ``duplicate``, ``invalid``,
            ``ambiguous`` or ``unknown`` (version "") for refused ones.
    """

    accepted: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)
    ambiguous: dict[str, str] = field(default_factory=dict)
    labels: dict[int, int] = field(default_factory=dict)
    source: str = ANONYMOUS_SOURCE
    quarantined: bool = False
    rows: dict[tuple[str, str], int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer of the feedback route."""
        return {
            "accepted": self.accepted,
            "unknown": self.unknown,
            "duplicate": self.duplicate,
            "invalid": self.invalid,
            "ambiguous": self.ambiguous,
            "source": self.source,
            "quarantined": self.quarantined,
        }


@dataclass(frozen=True, slots=True)
class SourceStat:
    """Labels of one source on one champion version, for one predicted class, label and confidence.

    Attributes:
        version: The version that made the predictions.
        source: The labeler source.
        predicted: The class the version predicted.
        target: The class the label named.
        confidence: The version's top-class probability, in whole percent (0..100).
        labels: How many labelled rows share these values.
    """

    version: int
    source: str
    predicted: int
    target: int
    confidence: int
    labels: int


@dataclass(frozen=True, slots=True)
class SourceLabels:
    """What one source has labelled of one model.

    Attributes:
        requests: Labelled requests.
        labels: Labelled rows.
        quarantined_labels: Rows that arrived while the source was quarantined.
    """

    requests: int
    labels: int
    quarantined_labels: int


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

    def add_feedback(
        self,
        model: str,
        items: Sequence[FeedbackItem],
        *,
        source: str = ANONYMOUS_SOURCE,
        quarantined: bool = False,
    ) -> FeedbackResult:
        """Stores labels under their source, durably, before it returns."""

    def recent_labelled(
        self, model: str, version: int, limit: int, *, exclude_sources: Collection[str] = ()
    ) -> list[LabelledRow]:
        """The most recent ``limit`` labelled rows of one version, newest first."""

    def count_labels(self, model: str, version: int) -> int:
        """Labelled rows of one version."""

    def trusted_labels_since(self, model: str, since: float, exclude_sources: Collection[str]) -> int:
        """Labelled rows stored after ``since`` by trusted sources."""

    def last_retrain_time(self, model: str) -> float | None:
        """When the newest retrain report was kept, or None."""

    def feedback_dataset(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ``[n, features]`` and targets ``[n]`` of every labelled row, oldest first."""

    def feedback_rows(self, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`feedback_dataset` plus each row's source and request id, oldest first."""

    def source_stats(self, model: str) -> list[SourceStat]:
        """The per-source counts of predicted class, label and confidence (classifiers)."""

    def label_sources(self, model: str) -> dict[str, SourceLabels]:
        """Labelled requests and rows per source."""

    def record_retrain(self, model: str, run_id: str, outcome: str, report: dict[str, Any]) -> None:
        """Keeps one retrain gate report."""

    def retrain_reports(self, model: str, limit: int = 10) -> list[dict[str, Any]]:
        """The newest gate reports of a model, newest first."""

    def prune(self, now: float | None = None) -> int:
        """Applies retention; returns the predictions deleted."""

    def close(self) -> None:
        """Releases the connections; later calls raise :class:`StoreUnavailable`."""

    def record_history(self, points: Sequence[HistoryPoint]) -> None:
        """Stores evaluation points (see :mod:`modelloop.monitoring.history`)."""

    def history(self, model: str, *, since: float, limit: int) -> dict[int, list[HistoryPoint]]:
        """Per version, the newest ``limit`` points at or after ``since``, oldest first."""

    def prune_history(self, *, retention_days: float, max_points: int, now: float | None = None) -> int:
        """Applies the history's retention; returns the points deleted."""

    def rollouts(self, model: str | None = None) -> dict[str, RolloutDoc]:
        """The stored rollout state of every model (or of one), by model."""

    def save_rollout(self, doc: RolloutDoc) -> bool:
        """Writes a rollout state if nobody changed it since ``doc.revision``; False if someone did."""

    def add_rollout_traffic(self, rows: Sequence[RolloutTraffic]) -> None:
        """Adds request counts and latency buckets to the rollouts' totals."""

    def rollout_traffic(self, rollout_id: str) -> list[RolloutTraffic]:
        """The totals of one rollout, one row per version and step."""

    def predicted_since(self, model: str, version: int, since: float, limit: int) -> list[float]:
        """The predicted classes (or values) of one version's newest requests since ``since``."""

    def delete_rollout(self, model: str) -> RolloutDoc | None:
        """Forgets a model's rollout state, RETIRED versions included; returns what it was."""

    def bind_repository(self, current: RepositoryIdentity, now: float | None = None) -> Binding:
        """Records the repository the store describes, or checks it is ``current``."""


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


def confidence_percent(output: Sequence[float]) -> int:
    """A classifier's top-class probability for one row, in whole percent (0..100).

    A binary model with one output column gives ``p(1)``; its confidence is
    ``max(p, 1 - p)``.
    """
    if len(output) == 1:
        top = max(float(output[0]), 1.0 - float(output[0]))
    else:
        top = max(float(v) for v in output) if len(output) else 0.0
    if not math.isfinite(top):
        return 0
    # The epsilon keeps 0.9 from reading as 89 after float32's round trip.
    return min(100, max(0, math.floor(top * 100 + 1e-6)))


def label_stats(
    version: int, source: str, task: str, predicted: str, outputs: str, targets: Sequence[Any]
) -> Counter[tuple[int, str, int, int, int]]:
    """The ``feedback_stats`` keys of one labelled request (classifiers; empty for regressors).

    Args:
        version: The version that answered.
        source: The labeler source.
        task: The prediction's task.
        predicted: The logged predicted classes (JSON).
        outputs: The logged outputs (JSON).
        targets: The labels, one per row.

    Returns:
        ``(version, source, predicted, target, confidence)`` -> rows.
    """
    counts: Counter[tuple[int, str, int, int, int]] = Counter()
    if task not in CLASSIFIER_TASKS:
        return counts
    classes, outs = orjson.loads(predicted), orjson.loads(outputs)
    for cls, out, target in zip(classes, outs, targets, strict=False):
        row = out if isinstance(out, list) else [out]
        counts[(version, source, int(cls), int(target), confidence_percent(row))] += 1
    return counts


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterator[Sequence[T]]:
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


class SqlPredictionStore:
    """The shared SQL of both backends, run through one SQLAlchemy engine per store.

    Subclasses build the engine (``self._engine``) and may override the hooks below; this
    class runs every call as one transaction on a connection checked out of the engine's
    pool, so calls from several threads run side by side, and turns every driver or pool
    error into :class:`StoreUnavailable`. The schema is created on the first call that
    reaches the database, so a store can be opened while its database is down.

    Args:
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Predictions older than this are deleted. Defaults to 30.
    """

    backend = "sql"
    _engine: Engine

    def __init__(self, *, retention_rows: int = 1_000_000, retention_days: float = 30.0) -> None:
        self.retention_rows = retention_rows
        self.retention_days = retention_days
        # The gate guards `_closed` and counts the calls in flight, so that close() can
        # wait for them before it closes the pool under their feet.
        self._gate = threading.Condition()
        self._active = 0
        self._closed = False
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    # -- backend hooks ---------------------------------------------------------------

    def _describe(self) -> str:
        """Names the database in messages; never includes a password."""
        return self.backend

    @property
    def _insert_prediction(self) -> str:
        """The prediction insert in the driver's own placeholder style."""
        # sqlite3 takes "?" (qmark); psycopg takes "%s" (format and pyformat).
        placeholder = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        return _INSERT_PREDICTION_DRIVER.format(p=placeholder)

    def _redact(self, message: str) -> str:
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
            message = self._redact(_first_line(exc))
            raise StoreUnavailable(f"{self._describe()}: {message}") from exc

    def _ensure_schema(self) -> None:
        """Creates the tables once per store; retried on the next call if it fails."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            with self._unavailable_on_error(), self._writer(True), self._engine.begin() as conn:
                self._lock_schema(conn)
                for statement in (*_SCHEMA, *HISTORY_SCHEMA, *ROLLOUT_SCHEMA, *BINDING_SCHEMA):
                    conn.execute(statement)
                _upgrade(conn)
            self._schema_ready = True

    def transaction(self, work: Callable[[Connection], T], *, write: bool) -> T:
        """Runs ``work(connection)`` in one transaction of this store's engine.

        The engine every store of the control plane shares: each kind of data (the
        prediction log, ...) keeps its own SQL in its own module and runs it here, with
        the same pooling, SQLite locking and error mapping.

        Raises:
            StoreUnavailable: The store is closed, or the database failed.
        """
        return self._run(work, write=write)

    @property
    def dialect(self) -> str:
        """The database: ``sqlite`` or ``postgresql``."""
        return str(self._engine.dialect.name)

    def _run(self, work: Callable[[Connection], T], *, write: bool) -> T:
        """Runs ``work(connection)`` in one transaction, committed before it returns.

        Args:
            work: The statements; it must not commit or roll back itself.
            write: Whether ``work`` writes; SQLite then takes its write lock up front.

        Raises:
            StoreUnavailable: The store is closed, or the database failed; the
                transaction was rolled back.
        """
        with self._gate:
            if self._closed:
                raise StoreUnavailable(f"the {self._describe()} store is closed")
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
        statement = self._insert_prediction

        def work(conn: Connection) -> None:
            # Ids already logged with another input: the later request is logged too, under
            # `<id>#<digest>`, and both are marked ambiguous (the insert's ON CONFLICT marks
            # the first). Every answered request is logged, whatever id it chose.
            known: dict[tuple[str, str], str] = {}
            by_model: dict[str, list[str]] = defaultdict(list)
            for r in records:
                by_model[r.model].append(r.request_id)
            for model, ids in by_model.items():
                for chunk in _chunks(list(dict.fromkeys(ids))):
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
                        _dumps(r.inputs),
                        _dumps(r.outputs),
                        _dumps(r.predicted),
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

        self._run(work, write=True)

    def add_feedback(
        self,
        model: str,
        items: Sequence[FeedbackItem],
        *,
        source: str = ANONYMOUS_SOURCE,
        quarantined: bool = False,
    ) -> FeedbackResult:
        """Joins labels to logged predictions and stores the valid ones, durably, under their source.

        The per-source counts of predicted class, label and confidence are updated in the
        same transaction, so they never disagree with the labels stored.

        Args:
            model: The model named in the route.
            items: One item per request id.
            source: The labeler that sent them. Defaults to ``anonymous``.
            quarantined: Whether that source is quarantined; its labels are stored and
                marked. Defaults to False.

        Returns:
            What happened to each id; an id repeated within ``items`` after being accepted
            counts as a duplicate.

        Raises:
            StoreUnavailable: The database cannot be reached; nothing was stored.
        """
        ids = list(dict.fromkeys(item.request_id for item in items))
        stored_as = "quarantined" if quarantined else "accepted"

        def work(conn: Connection) -> FeedbackResult:
            known: dict[str, tuple[int, str, int, int, str, str]] = {}
            ambiguous: set[str] = set()
            labelled: set[str] = set()
            for chunk in _chunks(ids):
                params = {"model": model, "ids": list(chunk)}
                for rid, version, task, classes, n_rows, predicted, outputs, mixed in conn.execute(
                    _SELECT_PREDICTED, params
                ):
                    known[rid] = (int(version), str(task), int(classes), int(n_rows), predicted, outputs)
                    if mixed:
                        ambiguous.add(rid)
                # Each source labels a prediction once; other sources' labels do not block it.
                labelled.update(rid for rid, by, _ in conn.execute(_SELECT_LABELLED, params) if by == source)
            result = FeedbackResult(source=source, quarantined=quarantined)
            rows: Counter[tuple[str, str]] = Counter()
            # The ids to insert, with their version and targets, and the fate of each
            # item in order: "duplicate" now, or "pending" until its INSERT tells.
            pending: dict[str, tuple[int, list[int | float]]] = {}
            fates: list[tuple[str, str]] = []
            for item in items:
                rid = item.request_id
                if rid in labelled or rid in pending:
                    fates.append(("duplicate", rid))
                    continue
                if rid not in known:
                    if rid not in result.unknown:
                        result.unknown.append(rid)
                    rows[("", "unknown")] += max(1, len(item.targets))
                    continue
                version, task, classes, n_rows, _, _ = known[rid]
                if rid in ambiguous:
                    result.ambiguous[rid] = AMBIGUOUS_ID
                    rows[(str(version), "ambiguous")] += n_rows
                    continue
                values, problem = check_targets(item.targets, n_rows, task, classes)
                if problem:
                    result.invalid[rid] = problem
                    rows[(str(version), "invalid")] += n_rows
                    continue
                pending[rid] = (version, values)
                fates.append(("pending", rid))
            # Inserted in request-id order: concurrent calls (pooled connections, other
            # replicas) then take the unique-index locks in one order and cannot deadlock.
            now = time.time()
            won: set[str] = set()
            for rid in sorted(pending):
                version, values = pending[rid]
                inserted = conn.execute(
                    _INSERT_FEEDBACK,
                    {
                        "model": model,
                        "request_id": rid,
                        "version": version,
                        "created": now,
                        "n_labels": len(values),
                        "targets": _dumps(values),
                        "source": source,
                        "quarantined": 1 if quarantined else 0,
                    },
                )
                # rowcount 0: another call or replica labelled it since the SELECT.
                if inserted.rowcount != 0:
                    won.add(rid)
            labels: dict[int, int] = defaultdict(int)
            stats: Counter[tuple[int, str, int, int, int]] = Counter()
            for fate, rid in fates:
                if fate == "pending" and rid in won:
                    result.accepted.append(rid)
                    version, values = pending[rid]
                    labels[version] += len(values)
                    rows[(str(version), stored_as)] += len(values)
                    _, task, _, _, predicted, outputs = known[rid]
                    stats.update(label_stats(version, source, task, predicted, outputs, values))
                else:
                    result.duplicate.append(rid)
                    seen = known.get(rid)
                    rows[(str(seen[0]), "duplicate") if seen else ("", "duplicate")] += seen[3] if seen else 1
            _add_stats(conn, model, stats)
            result.labels = dict(labels)
            result.rows = dict(rows)
            return result

        # The commit at the end of _run is the durability point: only then does the
        # caller learn what was accepted.
        return self._run(work, write=True)

    def recent_labelled(
        self, model: str, version: int, limit: int, *, exclude_sources: Collection[str] = ()
    ) -> list[LabelledRow]:
        """The newest ``limit`` labelled rows of one version, newest first.

        Args:
            model: The model.
            version: The version that made the predictions.
            limit: Most rows returned.
            exclude_sources: Sources whose labels are left out (quarantined ones).
                Defaults to none.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> list[Any]:
            # Each request has at least one row, so `limit` requests cover `limit` rows.
            params: dict[str, Any] = {"model": model, "version": version, "limit": limit}
            if exclude_sources:
                params["excluded"] = sorted(exclude_sources)
                return list(conn.execute(_SELECT_RECENT_TRUSTED, params).all())
            return list(conn.execute(_SELECT_RECENT, params).all())

        rows: list[LabelledRow] = []
        for predicted, targets, created in self._run(work, write=False):
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

        def work(conn: Connection) -> int:
            return int(conn.execute(_COUNT_LABELS, {"model": model, "version": version}).scalar_one())

        return self._run(work, write=False)

    def trusted_labels_since(self, model: str, since: float, exclude_sources: Collection[str]) -> int:
        """Labelled rows of a model stored after ``since``, by sources not excluded nor marked quarantined.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        # NOT IN () is not SQL: an impossible source name stands in for "none excluded".
        excluded = sorted(exclude_sources) or [""]

        def work(conn: Connection) -> int:
            params = {"model": model, "since": since, "excluded": excluded}
            return int(conn.execute(_COUNT_TRUSTED_SINCE, params).scalar_one())

        return self._run(work, write=False)

    def last_retrain_time(self, model: str) -> float | None:
        """When the newest retrain report of a model was kept, or None.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> float | None:
            value = conn.execute(_LAST_REPORT, {"model": model}).scalar_one()
            return None if value is None else float(value)

        return self._run(work, write=False)

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
        x, y, _, _ = self.feedback_rows(model)
        return x, y

    def feedback_rows(self, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`feedback_dataset` with each row's labeler source and request id, oldest first.

        A prediction labelled by several sources has one row per source (the caller keeps
        the trusted ones); predictions whose id is ambiguous have none.

        Returns:
            ``(x, y, sources, request_ids)``; ``sources`` and ``request_ids`` are ``[n]``
            arrays of ``str``.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> list[Any]:
            return list(conn.execute(_SELECT_DATASET, {"model": model}).all())

        fetched = self._run(work, write=False)
        xs: list[list[float]] = []
        ys: list[int | float] = []
        sources: list[str] = []
        rids: list[str] = []
        classifier = True
        for inputs, targets, task, source, rid in fetched:
            rows, values = orjson.loads(inputs), orjson.loads(targets)
            if len(rows) != len(values):
                continue
            xs.extend(rows)
            ys.extend(values)
            sources.extend([str(source)] * len(rows))
            # One key per labelled row: "<request id>/<row>", so one prediction's rows stay apart.
            rids.extend(f"{rid}/{i}" for i in range(len(rows)))
            classifier = task in CLASSIFIER_TASKS
        if not xs:
            return (
                np.zeros((0, 0), np.float32),
                np.zeros((0,), np.int64 if classifier else np.float32),
                np.zeros((0,), dtype=object),
                np.zeros((0,), dtype=object),
            )
        width = len(xs[-1])
        keep = [i for i, row in enumerate(xs) if len(row) == width]
        x = np.asarray([xs[i] for i in keep], dtype=np.float32)
        y = np.asarray([ys[i] for i in keep], dtype=np.int64 if classifier else np.float32)
        return (
            x,
            y,
            np.asarray([sources[i] for i in keep], dtype=object),
            np.asarray([rids[i] for i in keep], dtype=object),
        )

    def source_stats(self, model: str) -> list[SourceStat]:
        """Per source and champion version: how many labels named which class for which prediction.

        Classifiers only (regressors have no predicted class or confidence); the counts
        cover every label ever stored, pruned ones included.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> list[Any]:
            return list(conn.execute(_SELECT_STATS, {"model": model}).all())

        return [
            SourceStat(int(v), str(s), int(p), int(t), int(c), int(n))
            for v, s, p, t, c, n in self._run(work, write=False)
        ]

    def label_sources(self, model: str) -> dict[str, SourceLabels]:
        """Labelled requests and rows per source (rows kept under retention).

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> list[Any]:
            return list(conn.execute(_SELECT_SOURCES, {"model": model}).all())

        return {
            str(source): SourceLabels(int(requests), int(labels), int(marked))
            for source, requests, labels, marked in self._run(work, write=False)
        }

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
            "report": _dumps(report),
        }
        self._run(lambda conn: conn.execute(_INSERT_REPORT, params), write=True)

    def retrain_reports(self, model: str, limit: int = 10) -> list[dict[str, Any]]:
        """The newest ``limit`` gate reports of a model, newest first.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> list[Any]:
            return list(conn.execute(_SELECT_REPORTS, {"model": model, "limit": limit}).all())

        return [orjson.loads(report) for (report,) in self._run(work, write=False)]

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

        return self._run(work, write=True)

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

    # -- history (the SQL lives in monitoring/history.py) ---------------------------

    def record_history(self, points: Sequence[HistoryPoint]) -> None:
        """Stores evaluation points in one transaction; a repeated ``(model, version, t)`` keeps the first.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        if not points:
            return
        rows = [
            {"model": p.model, "version": p.version, "t": p.t, "point": _dumps(p.values)}
            for p in sorted(points, key=lambda p: (p.model, p.version, p.t))
        ]

        def work(conn: Connection) -> None:
            conn.execute(_history.INSERT_POINT, rows)

        self._run(work, write=True)

    def history(self, model: str, *, since: float, limit: int) -> dict[int, list[HistoryPoint]]:
        """Per version of ``model``, its newest ``limit`` points at or after ``since``, oldest first.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """

        def work(conn: Connection) -> dict[int, list[Any]]:
            versions = [
                int(v) for (v,) in conn.execute(_history.SELECT_VERSIONS, {"model": model, "since": since})
            ]
            return {
                v: list(
                    conn.execute(
                        _history.SELECT_POINTS, {"model": model, "version": v, "since": since, "limit": limit}
                    ).all()
                )
                for v in sorted(versions)
            }

        fetched = self._run(work, write=False)
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
            deleted = max(conn.execute(_history.DELETE_OLDER, {"cutoff": cutoff}).rowcount, 0)
            for model, version in list(conn.execute(_history.SELECT_SERIES).all()):
                key = {"model": model, "version": version}
                row = conn.execute(_history.NTH_NEWEST, {**key, "offset": max_points}).first()
                if row is not None:
                    deleted += max(conn.execute(_history.DELETE_UP_TO, {**key, "t": row[0]}).rowcount, 0)
            return deleted

        return self._run(work, write=True)

    def rollouts(self, model: str | None = None) -> dict[str, RolloutDoc]:
        """The stored rollout state of every model (or of one), by model.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        return self._run(lambda conn: read_rollouts(conn, model), write=False)

    def save_rollout(self, doc: RolloutDoc) -> bool:
        """Writes a rollout state if its stored revision is still ``doc.revision`` (0: none stored).

        Every worker and replica may decide a transition; the first write wins and the
        others see the new state on their next read.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        return self._run(lambda conn: save_rollout(conn, doc), write=True)

    def add_rollout_traffic(self, rows: Sequence[RolloutTraffic]) -> None:
        """Adds request counts and latency buckets to the rollouts' totals, in one transaction.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        if rows:
            self._run(lambda conn: add_rollout_traffic(conn, rows), write=True)

    def rollout_traffic(self, rollout_id: str) -> list[RolloutTraffic]:
        """The totals of one rollout, one row per version and step.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        return self._run(lambda conn: read_rollout_traffic(conn, rollout_id), write=False)

    def predicted_since(self, model: str, version: int, since: float, limit: int) -> list[float]:
        """The predicted classes (or values) of one version's newest ``limit`` requests since ``since``.

        Raises:
            StoreUnavailable: The database cannot be reached.
        """
        return self._run(lambda conn: read_predicted(conn, model, version, since, limit), write=False)

    def delete_rollout(self, model: str) -> RolloutDoc | None:
        """Forgets a model's rollout state, RETIRED versions included; returns what it was.

        Raises:
            StoreUnavailable: The database cannot be reached or written.
        """
        return self._run(lambda conn: delete_rollout(conn, model), write=True)

    def bind_repository(self, current: RepositoryIdentity, now: float | None = None) -> Binding:
        """Records the repository this store describes, or checks that it is ``current``.

        See :mod:`~modelloop.monitoring.binding`.

        Raises:
            RepositoryMismatch: The store describes another repository.
            StoreUnavailable: The database cannot be reached or written.
        """
        t = time.time() if now is None else now
        binding = self._run(lambda conn: bind_repository(conn, current, t), write=True)
        if not binding.recorded.same_as(current):
            raise RepositoryMismatch(binding.recorded, current, self._describe())
        return binding


def _add_stats(conn: Connection, model: str, stats: Counter[tuple[int, str, int, int, int]]) -> None:
    """Adds label counts to ``feedback_stats``, creating rows as needed."""
    if not stats:
        return
    # Sorted by key, like every other write, so concurrent upserts lock rows in one order.
    params = [
        {
            "model": model,
            "version": version,
            "source": source,
            "predicted": predicted,
            "target": target,
            "confidence": confidence,
            "labels": labels,
        }
        for (version, source, predicted, target, confidence), labels in sorted(stats.items())
    ]
    conn.execute(_ADD_STATS, params)


def _upgrade(conn: Connection) -> None:
    """Brings a database written by an older version up to the current schema.

    Runs in the schema transaction, under the schema lock: the missing columns are added,
    and a ``feedback_stats`` table that did not exist yet is filled from the labels
    already stored, so their sources are assessed too.
    """
    inspector = sa.inspect(conn)
    for table, column, definition in _ADDED_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            logger.info("upgrading the store: adding %s.%s", table, column)
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {definition}"))
    if "source" not in inspector.get_pk_constraint("feedback").get("constrained_columns", []):
        # One label per prediction before: rebuild with one per (prediction, source). Every
        # stored row fits the wider key, so nothing is lost.
        logger.info("upgrading the store: feedback keeps one label per source")
        conn.execute(sa.text(_FEEDBACK_TABLE.format(name="feedback_upgrade")))
        conn.execute(
            sa.text(
                f"INSERT INTO feedback_upgrade ({_FEEDBACK_COLUMNS}) SELECT {_FEEDBACK_COLUMNS} FROM feedback"
            )
        )
        conn.execute(sa.text("DROP TABLE feedback"))
        conn.execute(sa.text("ALTER TABLE feedback_upgrade RENAME TO feedback"))
        conn.execute(
            sa.text("CREATE INDEX IF NOT EXISTS feedback_version ON feedback (model, version, created)")
        )
    had_stats = inspector.has_table(_STATS_TABLE)
    for statement in _SCHEMA_AFTER_COLUMNS:
        conn.execute(statement)
    if had_stats:
        return
    by_model: dict[str, Counter[tuple[int, str, int, int, int]]] = defaultdict(Counter)
    for model, version, source, targets, task, predicted, outputs in conn.execute(_SELECT_ALL_LABELLED):
        by_model[model].update(
            label_stats(int(version), str(source), str(task), predicted, outputs, orjson.loads(targets))
        )
    for model, stats in sorted(by_model.items()):
        _add_stats(conn, model, stats)


class SQLitePredictionStore(SqlPredictionStore):
    """The embedded store: one SQLite file in WAL mode with ``synchronous=FULL``.

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
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Age bound in days. Defaults to 30.

    Raises:
        StoreUnavailable: The file cannot be created or opened.
    """

    backend = "sqlite"

    def __init__(self, path: Path, *, retention_rows: int = 1_000_000, retention_days: float = 30.0) -> None:
        super().__init__(retention_rows=retention_rows, retention_days=retention_days)
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

    def _describe(self) -> str:
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


class PostgresPredictionStore(SqlPredictionStore):
    """The shared store for several replicas, through psycopg 3 and a connection pool.

    The engine's ``QueuePool`` opens connections lazily (at most 5 kept, 5 more under
    load) and pings each one before use (``pool_pre_ping``), replacing it and the rest of
    the pool after a server restart. So a server starts while the database is down and
    recovers by itself when it returns; meanwhile calls raise :class:`StoreUnavailable`.
    Replicas that start together create the schema one at a time, under an advisory lock.
    Commits are durable with PostgreSQL's default ``synchronous_commit=on``.

    Args:
        url: A libpq URL, ``postgresql://user:pass@host:port/db`` (``postgres://`` too);
            it is opened with SQLAlchemy's ``postgresql+psycopg`` dialect.
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Age bound in days. Defaults to 30.
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
        retention_rows: int = 1_000_000,
        retention_days: float = 30.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(retention_rows=retention_rows, retention_days=retention_days)
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

    def _describe(self) -> str:
        # Host, port and database only: never echo the password. A socket directory may
        # come as ?host=... instead of in the authority.
        host = self._url.host or self._url.query.get("host") or "localhost"
        if not isinstance(host, str):  # ?host=a&host=b: libpq's multi-host form
            host = ",".join(host)
        return f"postgresql {host}:{self._url.port or 5432}/{self._url.database or ''}"

    def _redact(self, message: str) -> str:
        # libpq does not echo passwords; this is a second line of defence.
        return message.replace(self._password, "***") if self._password else message

    def _lock_schema(self, conn: Connection) -> None:
        # Replicas may start together; the advisory lock serialises CREATE IF NOT EXISTS,
        # which is not race-free on PostgreSQL's catalogs. It is released at commit.
        conn.execute(_SCHEMA_LOCK, {"key": _SCHEMA_LOCK_KEY})


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
    # The scheme only: the rest of a URL may hold a password.
    scheme = url.split("://", 1)[0] if "://" in url else url[:20]
    raise StoreUnavailable(f"unknown store URL scheme {scheme!r}: use sqlite:///path or postgresql://...")
