"""Labels and their labelers: the ``feedback`` and ``feedback_stats`` tables.

Feedback labels are joined to logged predictions by ``(model, request_id)``. A label is
committed (and, on SQLite, fsynced: WAL with ``synchronous=FULL``) before
:meth:`FeedbackStore.add_feedback` returns, so a label acknowledged to a client survives
``kill -9``. Each source labels a prediction once (a duplicate never overwrites its first
label), and several sources' labels of one prediction are all kept; accuracy counts the
first trusted one. No label joins a request id that answered two different inputs.

Each label keeps its source (the labeler its token named, ``anonymous`` without
authentication) and whether that source was quarantined when the label arrived. In the
same transaction the store counts, per source, which class the champion predicted, with
what confidence, and which class the label named (``feedback_stats``): the per-source
agreement and confusion that the label checks read. Those counts outlive retention, so a
source's history is not forgotten when old predictions are pruned.

Example:

```python
feedback = FeedbackStore(engine)
feedback.add_feedback("digits", [FeedbackItem("r1", [3])]).accepted  # ['r1']
```
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from modelloop.monitoring.stores.engine import StoreEngine, chunks, dumps
from modelloop.monitoring.stores.records import (
    CLASSIFIER_TASKS,
    FeedbackItem,
    FeedbackResult,
    LabelledRow,
    SourceLabels,
    SourceStat,
)
from modelloop.tokens import ANONYMOUS_SOURCE

# The feedback table keeps one label per (prediction, source); older databases kept one per
# prediction and are rebuilt with the wider key (their rows all fit it).
FEEDBACK_COLUMNS = "model, request_id, version, created, n_labels, targets, source, quarantined"
FEEDBACK_TABLE = """CREATE TABLE {name} (
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

FEEDBACK_SCHEMA = tuple(
    sa.text(statement)
    for statement in (
        FEEDBACK_TABLE.format(name="IF NOT EXISTS feedback"),
        "CREATE INDEX IF NOT EXISTS feedback_version ON feedback (model, version, created)",
    )
)
"""The ``feedback`` table as its first version had it; older databases gain the columns below."""
# Columns added since the first schema: (table, column, definition).
FEEDBACK_ADDED_COLUMNS = (
    ("feedback", "source", "TEXT NOT NULL DEFAULT 'anonymous'"),
    ("feedback", "quarantined", "INTEGER NOT NULL DEFAULT 0"),
)
STATS_TABLE = "feedback_stats"
STATS_SCHEMA = tuple(
    sa.text(statement)
    for statement in (
        "CREATE INDEX IF NOT EXISTS feedback_source ON feedback (model, source)",
        # One row per (version, source, predicted class, label, confidence in percent):
        # a few hundred rows per source, whatever the traffic.
        f"""CREATE TABLE IF NOT EXISTS {STATS_TABLE} (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        source TEXT NOT NULL,
        predicted INTEGER NOT NULL,
        target INTEGER NOT NULL,
        confidence INTEGER NOT NULL,
        labels INTEGER NOT NULL,
        PRIMARY KEY (model, version, source, predicted, target, confidence)
    )""",
    )
)
"""Created after the added columns: the source index needs ``feedback.source``."""

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
    f"INSERT INTO {STATS_TABLE} (model, version, source, predicted, target, confidence, labels) "
    "VALUES (:model, :version, :source, :predicted, :target, :confidence, :labels) "
    "ON CONFLICT (model, version, source, predicted, target, confidence) "
    f"DO UPDATE SET labels = {STATS_TABLE}.labels + excluded.labels"
)
_SELECT_STATS = sa.text(
    f"SELECT version, source, predicted, target, confidence, labels FROM {STATS_TABLE} WHERE model = :model"
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
_COUNT_TRUSTED_SINCE = sa.text(
    "SELECT COALESCE(SUM(n_labels), 0) FROM feedback "
    "WHERE model = :model AND created > :since AND quarantined = 0 AND source NOT IN :excluded"
).bindparams(sa.bindparam("excluded", expanding=True))
_COUNT_LABELS = sa.text(
    "SELECT COALESCE(SUM(n_labels), 0) FROM feedback WHERE model = :model AND version = :version"
)
_SELECT_DATASET = sa.text(
    "SELECT p.inputs, f.targets, p.task, f.source, f.request_id FROM feedback f JOIN predictions p "
    "ON p.model = f.model AND p.request_id = f.request_id "
    "WHERE f.model = :model AND p.ambiguous = 0 ORDER BY f.created, f.request_id, f.source"
)

AMBIGUOUS_ID = (
    "this request id answered requests with different inputs, so a label cannot tell which one it "
    "belongs to; give every request its own id (a retry may reuse it with the same input)"
)


class SourceCounts(Protocol):
    """The per-source label counts the label checks read; may raise ``StoreUnavailable``."""

    def source_stats(self, model: str) -> list[SourceStat]:
        """The per-source counts of predicted class, label and confidence (classifiers)."""


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


def add_stats(conn: Connection, model: str, stats: Counter[tuple[int, str, int, int, int]]) -> None:
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


def count_all_labels(conn: Connection) -> None:
    """Fills ``feedback_stats`` from every label stored (a database from before the counts)."""
    by_model: dict[str, Counter[tuple[int, str, int, int, int]]] = defaultdict(Counter)
    for model, version, source, targets, task, predicted, outputs in conn.execute(_SELECT_ALL_LABELLED):
        by_model[model].update(
            label_stats(int(version), str(source), str(task), predicted, outputs, orjson.loads(targets))
        )
    for model, stats in sorted(by_model.items()):
        add_stats(conn, model, stats)


class FeedbackStore:
    """Labels, their sources and the per-source counts, on the shared engine.

    Args:
        engine: The database.
    """

    def __init__(self, engine: StoreEngine) -> None:
        self.engine = engine

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
            for chunk in chunks(ids):
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
                        "targets": dumps(values),
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
            add_stats(conn, model, stats)
            result.labels = dict(labels)
            result.rows = dict(rows)
            return result

        # The commit at the end of _run is the durability point: only then does the
        # caller learn what was accepted.
        return self.engine.transaction(work, write=True)

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
        for predicted, targets, created in self.engine.transaction(work, write=False):
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

        return self.engine.transaction(work, write=False)

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

        return self.engine.transaction(work, write=False)

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

        fetched = self.engine.transaction(work, write=False)
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
            for v, s, p, t, c, n in self.engine.transaction(work, write=False)
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
            for source, requests, labels, marked in self.engine.transaction(work, write=False)
        }
