"""The prediction and feedback store, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from modelloop.monitoring.stores import Stores, open_stores
from modelloop.monitoring.stores.engine import PostgresEngine, StoreUnavailable, _switch_to_wal
from modelloop.monitoring.stores.feedback import check_targets
from modelloop.monitoring.stores.records import FeedbackItem, FeedbackResult, PredictionRecord


def rec(rid: str, rows: int = 1, version: int = 1, task: str = "multiclass", created: float | None = None):
    predicted: list[int | float] = (
        [float(i) + 0.5 for i in range(rows)] if task == "regression" else [i % 10 for i in range(rows)]
    )
    return PredictionRecord(
        request_id=rid,
        model="digits",
        version=version,
        created=time.time() if created is None else created,
        inputs=[[float(i), float(i + 1)] for i in range(rows)],
        outputs=[[0.1] * 10 for _ in range(rows)],
        predicted=predicted,
        task=task,
        classes=10 if task == "multiclass" else (2 if task == "binary" else 0),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'modelloop.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Stores]:
    s = open_stores(store_url)
    try:
        yield s
    finally:
        s.close()


def test_feedback_joins_by_request_id(store: Stores):
    store.predictions.record([rec("a", rows=3), rec("b"), rec("c", rows=2, version=2)])
    result = store.feedback.add_feedback(
        "digits",
        [
            FeedbackItem("a", [0, 1, 5]),
            FeedbackItem("b", [0]),
            FeedbackItem("c", [1, 1]),
            FeedbackItem("x", [1]),
        ],
    )
    assert result.accepted == ["a", "b", "c"]
    assert result.unknown == ["x"] and result.duplicate == [] and result.invalid == {}
    assert result.labels == {1: 4, 2: 2}
    assert store.feedback.count_labels("digits", 1) == 4 and store.feedback.count_labels("digits", 2) == 2
    rows = store.feedback.recent_labelled("digits", 1, 10)
    assert sorted((r.predicted, r.target) for r in rows) == [(0, 0), (0, 0), (1, 1), (2, 5)]
    assert len(store.feedback.recent_labelled("digits", 1, 2)) == 2
    # Feedback for another model never sees these predictions.
    assert store.feedback.add_feedback("other", [FeedbackItem("a", [0, 1, 5])]).unknown == ["a"]


def test_every_source_keeps_its_own_label_and_the_first_trusted_one_counts(store: Stores):
    store.predictions.record([rec("a"), rec("b")])
    # mallory labels first; alice's labels of the same predictions are still stored.
    assert store.feedback.add_feedback(
        "digits", [FeedbackItem("a", [8]), FeedbackItem("b", [8])], source="mallory"
    ).accepted
    later = store.feedback.add_feedback(
        "digits", [FeedbackItem("a", [0]), FeedbackItem("b", [1])], source="alice"
    )
    assert later.accepted == ["a", "b"] and later.duplicate == []
    again = store.feedback.add_feedback("digits", [FeedbackItem("a", [5])], source="alice")
    assert again.accepted == [] and again.duplicate == ["a"]
    assert set(store.feedback.label_sources("digits")) == {"mallory", "alice"}
    # Accuracy: one label per prediction, the first from a source that is not excluded.
    assert sorted(r.target for r in store.feedback.recent_labelled("digits", 1, 10)) == [8, 8]
    trusted = store.feedback.recent_labelled("digits", 1, 10, exclude_sources={"mallory"})
    assert sorted(r.target for r in trusted) == [0, 1]
    # Training sees every label with its source and one key per labelled row.
    _, y, sources, keys = store.feedback.feedback_rows("digits")
    assert sorted(zip(sources.tolist(), y.tolist(), strict=True)) == [
        ("alice", 0),
        ("alice", 1),
        ("mallory", 8),
        ("mallory", 8),
    ]
    assert sorted(set(keys.tolist())) == ["a/0", "b/0"]


def test_a_reused_request_id_is_logged_twice_and_its_labels_refused(store: Stores):
    first = PredictionRecord(
        "order-18", "digits", 1, time.time(), [[16.0] * 2], [[0.1] * 10], [0], input_hash="aa" * 16
    )
    retry = PredictionRecord(
        "order-18", "digits", 1, time.time(), [[16.0] * 2], [[0.1] * 10], [0], input_hash="aa" * 16
    )
    other = PredictionRecord(
        "order-18", "digits", 1, time.time(), [[2.0] * 2], [[0.1] * 10], [1], input_hash="bb" * 16
    )
    fine = PredictionRecord(
        "order-19", "digits", 1, time.time(), [[3.0] * 2], [[0.1] * 10], [3], input_hash="cc" * 16
    )
    store.predictions.record([first, fine])
    store.predictions.record([retry])  # a retry with the same input stays one prediction
    ok = store.feedback.add_feedback("digits", [FeedbackItem("order-19", [3])])
    assert ok.accepted == ["order-19"]
    store.predictions.record([other])  # the same id with another input: both logged, the id is ambiguous
    result = store.feedback.add_feedback("digits", [FeedbackItem("order-18", [2])])
    assert result.accepted == [] and "different inputs" in result.ambiguous["order-18"]
    assert result.rows == {("1", "ambiguous"): 1}
    # The later request was logged under a key of its own, and nothing joins to it either.
    _, y, _, keys = store.feedback.feedback_rows("digits")
    assert keys.tolist() == ["order-19/0"] and y.tolist() == [3]
    # In one batch too: the first and the second are told apart.
    a = PredictionRecord(
        "dup", "digits", 1, time.time(), [[1.0] * 2], [[0.1] * 10], [1], input_hash="dd" * 16
    )
    b = PredictionRecord(
        "dup", "digits", 1, time.time(), [[9.0] * 2], [[0.1] * 10], [9], input_hash="ee" * 16
    )
    store.predictions.record([a, b])
    assert store.feedback.add_feedback("digits", [FeedbackItem("dup", [1])]).ambiguous


def test_a_duplicate_label_never_overwrites_the_first(store: Stores):
    store.predictions.record([rec("a")])
    assert store.feedback.add_feedback("digits", [FeedbackItem("a", [3])]).accepted == ["a"]
    again = store.feedback.add_feedback("digits", [FeedbackItem("a", [7]), FeedbackItem("a", [8])])
    assert again.accepted == [] and again.duplicate == ["a", "a"]
    assert [r.target for r in store.feedback.recent_labelled("digits", 1, 5)] == [3]
    # Within one batch the first is accepted, the second is a duplicate.
    store.predictions.record([rec("b")])
    batch = store.feedback.add_feedback("digits", [FeedbackItem("b", [1]), FeedbackItem("b", [2])])
    assert batch.accepted == ["b"] and batch.duplicate == ["b"]
    assert store.feedback.count_labels("digits", 1) == 2


@pytest.mark.parametrize(
    ("targets", "problem"),
    [
        ([1], "expected 3 targets"),
        ([1, 2, 3, 4], "expected 3 targets"),
        ([1, "2", 3], "target 1 is str, not a number"),
        ([1, None, 3], "target 1 is NoneType"),
        ([True, 1, 2], "target 0 is bool"),
        ([1, 2, 10], "outside the class ids 0..9"),
        ([1, -1, 2], "outside the class ids"),
        ([1, 2.5, 3], "not a class id"),
        ([1, [2], 3], "target 1 is list"),
    ],
)
def test_invalid_targets_are_refused_and_change_nothing(store: Stores, targets, problem):
    store.predictions.record([rec("a", rows=3), rec("ok")])
    result = store.feedback.add_feedback("digits", [FeedbackItem("a", targets), FeedbackItem("ok", [4])])
    assert result.accepted == ["ok"]
    assert problem in result.invalid["a"]
    assert store.feedback.count_labels("digits", 1) == 1
    # The id can still be labelled correctly afterwards.
    assert store.feedback.add_feedback("digits", [FeedbackItem("a", [1, 2, 3.0])]).accepted == ["a"]


def test_check_targets_per_task():
    assert check_targets([0.5, 2], 2, "regression", 0) == ([0.5, 2.0], "")
    assert check_targets([float("nan")], 1, "regression", 0)[1] == "target 0 is not a finite number"
    assert check_targets([1, 0], 2, "binary", 2) == ([1, 0], "")
    assert "outside" in check_targets([2], 1, "binary", 2)[1]
    assert check_targets(3, 1, "multiclass", 10)[1].startswith("targets must be a list")
    assert check_targets([3.0], 1, "multiclass", 10) == ([3], "")


def test_regression_labels_and_dataset(store: Stores):
    store.predictions.record([rec("r1", rows=2, task="regression"), rec("r2", task="regression")])
    assert store.feedback.add_feedback(
        "digits", [FeedbackItem("r1", [1.0, 2.5]), FeedbackItem("r2", [-3])]
    ).accepted == [
        "r1",
        "r2",
    ]
    x, y = store.feedback.feedback_dataset("digits")
    assert x.shape == (3, 2) and x.dtype == np.float32
    assert y.dtype == np.float32 and sorted(y.tolist()) == [-3.0, 1.0, 2.5]


def test_feedback_dataset_for_retraining(store: Stores):
    x, y = store.feedback.feedback_dataset("digits")
    assert x.shape == (0, 0) and y.shape == (0,)
    store.predictions.record([rec("a", rows=2), rec("b"), rec("unlabelled")])
    store.feedback.add_feedback("digits", [FeedbackItem("a", [4, 5])])
    store.feedback.add_feedback("digits", [FeedbackItem("b", [6])])
    x, y = store.feedback.feedback_dataset("digits")
    assert x.tolist() == [[0.0, 1.0], [1.0, 2.0], [0.0, 1.0]]
    assert y.tolist() == [4, 5, 6] and y.dtype == np.int64


def test_a_repeated_request_id_keeps_the_first_prediction(store: Stores):
    first = rec("a", rows=1)
    second = PredictionRecord("a", "digits", 2, time.time(), [[9.0, 9.0]], [[0.0] * 10], [9, 9], classes=10)
    store.predictions.record([first])
    store.predictions.record([second])
    result = store.feedback.add_feedback("digits", [FeedbackItem("a", [0])])
    assert result.accepted == ["a"] and result.labels == {1: 1}


def test_retention_by_age_and_rows(store_url: str):
    store = open_stores(store_url, retention_rows=3, retention_days=1)
    try:
        now = time.time()
        store.predictions.record(
            [rec("old", created=now - 2 * 86400)] + [rec(f"r{i}", created=now - 100 + i) for i in range(5)]
        )
        store.feedback.add_feedback(
            "digits", [FeedbackItem("old", [0]), FeedbackItem("r0", [0]), FeedbackItem("r4", [0])]
        )
        assert store.predictions.prune(now) == 3  # "old" by age, r0 and r1 by rows
        assert store.feedback.count_labels("digits", 1) == 1  # the labels of pruned predictions go too
        assert store.feedback.add_feedback("digits", [FeedbackItem("r1", [0])]).unknown == ["r1"]
        assert store.feedback.add_feedback("digits", [FeedbackItem("r2", [0])]).accepted == ["r2"]
        assert store.predictions.prune(now) == 0
    finally:
        store.close()


def test_closed_store_is_unavailable(store: Stores):
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.feedback.add_feedback("digits", [FeedbackItem("a", [1])])
    with pytest.raises(StoreUnavailable):
        store.predictions.record([rec("a")])


def test_sqlite_is_wal_with_full_sync(tmp_path: Path):
    store = open_stores(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        store.predictions.record([rec("a")])
        # Any connection of the store's pool: each one is set up when it is opened.
        with store.engine._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()
    # A second process (connection) sees the committed rows.
    with sqlite3.connect(tmp_path / "m.db") as other:
        assert other.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1


def test_sqlite_unwritable_location_is_unavailable(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="sqlite"):
        open_stores(f"sqlite:///{blocker / 'sub' / 'm.db'}")


def test_unknown_scheme_is_refused():
    with pytest.raises(StoreUnavailable, match="unknown store URL"):
        open_stores("mysql://localhost/x")


def test_unreachable_postgres_is_unavailable_and_hides_the_password():
    import socket

    # Bound for the whole test and never listened on: connections to it are refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        store = open_stores(f"postgresql://u:secret@127.0.0.1:{port}/db")
        with pytest.raises(StoreUnavailable) as info:
            store.feedback.add_feedback("digits", [FeedbackItem("a", [1])])
        assert "secret" not in info.value.message and f"127.0.0.1:{port}" in info.value.message
        store.close()


def test_postgres_replicas_share_labels_and_race_safely(postgres_url: str):
    a, b = open_stores(postgres_url), open_stores(postgres_url)
    try:
        a.predictions.record([rec(f"r{i}") for i in range(20)])
        results = []

        def label(store: Stores) -> None:
            results.append(
                store.feedback.add_feedback("digits", [FeedbackItem(f"r{i}", [1]) for i in range(20)])
            )

        threads = [threading.Thread(target=label, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted = results[0].accepted + results[1].accepted
        duplicate = results[0].duplicate + results[1].duplicate
        assert sorted(accepted) == sorted(f"r{i}" for i in range(20))
        assert sorted(duplicate) == sorted(accepted)
        assert b.feedback.count_labels("digits", 1) == 20
    finally:
        a.close()
        b.close()


def test_postgres_lost_connection_reconnects(postgres_url: str):
    import psycopg

    store = open_stores(postgres_url)
    try:
        store.predictions.record([rec("a"), rec("b")])
        store.feedback.add_feedback("digits", [FeedbackItem("a", [1])])
        # The server ends the session (a restart or failover looks the same to the client).
        dbname = postgres_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
        # At most one call fails, with StoreUnavailable; the next one reconnects.
        try:
            result = store.feedback.add_feedback("digits", [FeedbackItem("b", [2])])
        except StoreUnavailable:
            result = store.feedback.add_feedback("digits", [FeedbackItem("b", [2])])
        assert result.accepted == ["b"]
        assert store.feedback.count_labels("digits", 1) == 2
    finally:
        store.close()


def test_concurrent_calls_from_several_threads(store: Stores):
    """The observer, feedback calls and the evaluator share one store, all at once; on
    PostgreSQL the calls run on several pooled connections and race for the same ids."""
    writers, per_writer = 6, 15
    done = threading.Event()

    def observe_and_label(w: int) -> FeedbackResult:
        ids = [f"w{w}-{i}" for i in range(per_writer)]
        for rid in ids:
            store.predictions.record([rec(rid)])
        # Every writer labels its own ids and races the next writer for its ids.
        mine = [FeedbackItem(rid, [1]) for rid in ids]
        theirs = [FeedbackItem(f"w{(w + 1) % writers}-{i}", [2]) for i in range(per_writer)]
        return store.feedback.add_feedback("digits", mine + theirs)

    def evaluate() -> int:
        rounds = 0
        while not done.is_set():
            store.feedback.count_labels("digits", 1)
            store.feedback.recent_labelled("digits", 1, 50)
            store.feedback.feedback_dataset("digits")
            rounds += 1
        return rounds

    with ThreadPoolExecutor(max_workers=writers + 1) as pool:
        evaluator = pool.submit(evaluate)
        try:
            # .result() re-raises what a thread raised (StoreUnavailable on a deadlock).
            results = [
                f.result(timeout=120) for f in [pool.submit(observe_and_label, w) for w in range(writers)]
            ]
        finally:
            done.set()
        assert evaluator.result(timeout=60) >= 1
    total = writers * per_writer
    accepted = [rid for r in results for rid in r.accepted]
    unknown = [rid for r in results for rid in r.unknown]
    duplicate = [rid for r in results for rid in r.duplicate]
    # Each id is labelled exactly once; the other attempt is a duplicate, or unknown when
    # it ran before the owner had logged the prediction.
    assert sorted(accepted) == sorted(set(accepted)) and len(accepted) == total
    assert len(accepted) + len(unknown) + len(duplicate) == 2 * total
    assert store.feedback.count_labels("digits", 1) == total
    assert len(store.feedback.feedback_dataset("digits")[1]) == total


def test_feedback_for_more_ids_than_one_in_list(store: Stores):
    """The IN lists are expanding bind parameters, sent in chunks of 500 ids."""
    ids = [f"r{i}" for i in range(1203)]
    store.predictions.record([rec(rid) for rid in ids[:1100]])
    result = store.feedback.add_feedback("digits", [FeedbackItem(rid, [0]) for rid in ids])
    assert result.accepted == ids[:1100] and result.unknown == ids[1100:]
    again = store.feedback.add_feedback("digits", [FeedbackItem(rid, [1]) for rid in ids[::100]])
    assert again.duplicate == ids[:1100:100] and again.unknown == ids[1100::100]
    assert store.feedback.count_labels("digits", 1) == 1100


def test_sqlite_reads_run_beside_a_writer_and_writes_wait_for_its_lock(tmp_path: Path):
    store = open_stores(f"sqlite:///{tmp_path / 'm.db'}")
    other = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        store.predictions.record([rec("a")])
        store.feedback.add_feedback("digits", [FeedbackItem("a", [1])])
        # Another process holds the write lock: reads (deferred BEGIN, WAL snapshot) go on.
        # A read that waited for the lock would fail "database is locked" after the busy
        # timeout, since the lock is held until the ROLLBACK below.
        other.execute("BEGIN IMMEDIATE")
        assert store.feedback.count_labels("digits", 1) == 1
        # A write (BEGIN IMMEDIATE) waits in the busy timeout until the lock is released.
        written = threading.Event()

        def write() -> None:
            store.predictions.record([rec("b")])
            written.set()

        writer = threading.Thread(target=write)
        writer.start()
        assert not written.wait(0.5)
        other.execute("ROLLBACK")
        assert written.wait(10)
        writer.join()
        assert store.feedback.add_feedback("digits", [FeedbackItem("b", [2])]).accepted == ["b"]
    finally:
        other.close()
        store.close()


def test_postgres_store_uses_a_bounded_pool_through_psycopg(postgres_url: str):
    from sqlalchemy.pool import QueuePool

    store = open_stores(postgres_url.replace("postgresql://", "postgres://", 1))
    try:
        assert isinstance(store.engine, PostgresEngine)
        engine = store.engine._engine
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        assert isinstance(engine.pool, QueuePool) and engine.pool._pre_ping
        assert engine.pool.size() == 5 and engine.pool._max_overflow == 5
        store.predictions.record([rec(f"r{i}") for i in range(10)])
        threads = [
            threading.Thread(
                target=store.feedback.add_feedback, args=("digits", [FeedbackItem(f"r{i}", [0])])
            )
            for i in range(10)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.feedback.count_labels("digits", 1) == 10
        assert engine.pool.checkedin() <= 10
    finally:
        store.close()


def test_postgres_bad_url_is_unavailable_and_hides_the_password():
    with pytest.raises(StoreUnavailable) as info:
        open_stores("postgresql://u:secret@127.0.0.1:notaport/db")
    assert "secret" not in info.value.message
    with pytest.raises(StoreUnavailable) as info:
        open_stores("mysql://u:secret@127.0.0.1/db")
    assert "secret" not in info.value.message


class _TcpProxy:
    """Forwards a loopback port to the test cluster; stopping it is the database going away.

    The port is bound from the start and stays bound while the proxy is stopped (a bound
    socket that does not listen refuses connections), so no other process can take it.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = self._bind(0)
        self.port = int(self._listener.getsockname()[1])
        self._listening = False

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def start(self) -> _TcpProxy:
        self._stop.clear()
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._listening = True
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._listening:
            # A listening socket cannot stop listening: a new one holds the port, unlistened.
            self._listener.close()
            self._listener = self._bind(self.port)
            self._listening = False
        self._sockets, self._threads = [], []

    def close(self) -> None:
        self.stop()
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, server):
                sock.settimeout(0.05)
                self._sockets.append(sock)
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with contextlib.suppress(OSError):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_postgres_store_starts_while_the_database_is_down_and_recovers(postgres_cluster, postgres_url):
    proxy = _TcpProxy(postgres_cluster.port)
    port = proxy.port
    name = postgres_url.rsplit("/", 1)[1]
    # Nothing listens on `port` yet: opening the store must not connect.
    store = open_stores(f"postgresql://postgres:secret@127.0.0.1:{port}/{name}")
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.feedback.count_labels("digits", 1)
        assert "\n" not in info.value.message and "secret" not in info.value.message
        assert f"127.0.0.1:{port}/{name}" in info.value.message

        proxy.start()  # the database comes up: the schema is created on the first call
        store.predictions.record([rec("a"), rec("b"), rec("c")])
        assert store.feedback.add_feedback("digits", [FeedbackItem("a", [1])]).accepted == ["a"]

        proxy.stop()  # it goes away, pooled connections and all
        with pytest.raises(StoreUnavailable) as info:
            store.feedback.add_feedback("digits", [FeedbackItem("b", [2])])
        assert "\n" not in info.value.message and "secret" not in info.value.message

        proxy.start()  # and comes back: the pool pings, drops the dead connections, reconnects
        assert store.feedback.add_feedback("digits", [FeedbackItem("b", [2])]).accepted == ["b"]
        assert store.feedback.add_feedback("digits", [FeedbackItem("a", [3])]).duplicate == ["a"]
        assert store.feedback.count_labels("digits", 1) == 2
    finally:
        store.close()
        proxy.close()


def probs(rows: int, cls: int, top: float) -> list[list[float]]:
    """Outputs whose top class is ``cls`` with probability ``top``."""
    out = [[(1.0 - top) / 9] * 10 for _ in range(rows)]
    for row in out:
        row[cls] = top
    return out


def test_labels_keep_their_source_and_per_source_counts(store: Stores):
    store.predictions.record(
        [
            PredictionRecord(
                "a", "digits", 1, time.time(), [[0.0]] * 2, probs(2, 3, 0.97), [3, 3], classes=10
            ),
            PredictionRecord("b", "digits", 1, time.time(), [[1.0]], probs(1, 5, 0.55), [5], classes=10),
            PredictionRecord("c", "digits", 1, time.time(), [[2.0]], probs(1, 1, 0.9), [1], classes=10),
        ]
    )
    first = store.feedback.add_feedback(
        "digits", [FeedbackItem("a", [8, 3]), FeedbackItem("x", [1])], source="mallory"
    )
    assert first.as_dict()["source"] == "mallory" and first.as_dict()["quarantined"] is False
    assert first.rows == {("1", "accepted"): 2, ("", "unknown"): 1}
    marked = store.feedback.add_feedback(
        "digits", [FeedbackItem("b", [5])], source="mallory", quarantined=True
    )
    assert marked.quarantined and marked.rows == {("1", "quarantined"): 1}
    # Another source labels "a" too: its label is kept beside mallory's, not refused.
    again = store.feedback.add_feedback("digits", [FeedbackItem("c", [1]), FeedbackItem("a", [3, 3])])
    assert again.source == "anonymous" and again.rows == {("1", "accepted"): 3}
    stats = sorted(
        (s.source, s.predicted, s.target, s.confidence, s.labels)
        for s in store.feedback.source_stats("digits")
    )
    # 0.9 in float32 must still read as 90 %.
    assert stats == [
        ("anonymous", 1, 1, 90, 1),
        ("anonymous", 3, 3, 97, 2),
        ("mallory", 3, 3, 97, 1),
        ("mallory", 3, 8, 97, 1),
        ("mallory", 5, 5, 55, 1),
    ]
    sources = store.feedback.label_sources("digits")
    assert sources["mallory"].labels == 3 and sources["mallory"].quarantined_labels == 1
    assert sources["mallory"].requests == 2 and sources["anonymous"].labels == 3
    _, y, who, keys = store.feedback.feedback_rows("digits")
    assert y.tolist() == [8, 3, 5, 3, 3, 1]
    assert who.tolist() == ["mallory"] * 3 + ["anonymous"] * 3
    assert keys.tolist() == ["a/0", "a/1", "b/0", "a/0", "a/1", "c/0"]
    # With mallory left out, "a" counts with the anonymous labels, not mallory's first ones.
    trusted = store.feedback.recent_labelled("digits", 1, 10, exclude_sources={"mallory"})
    assert sorted((r.predicted, r.target) for r in trusted) == [(1, 1), (3, 3), (3, 3)]
    # Without exclusions, each prediction counts once, with its first label.
    assert sorted((r.predicted, r.target) for r in store.feedback.recent_labelled("digits", 1, 10)) == [
        (1, 1),
        (3, 3),
        (3, 8),
        (5, 5),
    ]


def test_gate_reports_are_kept_newest_first(store: Stores):
    store.retrains.record_retrain("digits", "run-1", "rejected", {"run_id": "run-1", "slices": {"rows": []}})
    store.retrains.record_retrain("digits", "run-2", "blessed", {"run_id": "run-2"})
    store.retrains.record_retrain("digits", "run-2", "blessed", {"run_id": "ignored"})
    assert [r["run_id"] for r in store.retrains.retrain_reports("digits")] == ["run-2", "run-1"]
    assert store.retrains.retrain_reports("other") == []


_OLD_SCHEMA = (
    """CREATE TABLE predictions (model TEXT NOT NULL, request_id TEXT NOT NULL, version INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL, task TEXT NOT NULL, classes INTEGER NOT NULL, n_rows INTEGER NOT NULL,
    inputs TEXT NOT NULL, outputs TEXT NOT NULL, predicted TEXT NOT NULL, PRIMARY KEY (model, request_id))""",
    """CREATE TABLE feedback (model TEXT NOT NULL, request_id TEXT NOT NULL, version INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL, n_labels INTEGER NOT NULL, targets TEXT NOT NULL,
    PRIMARY KEY (model, request_id))""",
    """INSERT INTO predictions VALUES ('digits', 'old', 1, 1.0, 'multiclass', 10, 2, '[[0.0], [1.0]]',
    '[[0.99, 0.01, 0, 0, 0, 0, 0, 0, 0, 0], [0.01, 0.99, 0, 0, 0, 0, 0, 0, 0, 0]]', '[0, 1]')""",
    "INSERT INTO feedback VALUES ('digits', 'old', 1, 2.0, 2, '[0, 7]')",
)


def test_a_database_of_an_older_version_is_upgraded_in_place(store_url: str):
    import sqlalchemy as sa

    if store_url.startswith("sqlite"):
        Path(store_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(store_url)
    else:
        engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        for statement in _OLD_SCHEMA:
            conn.execute(sa.text(statement))
    engine.dispose()
    store = open_stores(store_url)
    try:
        # The old label is there, under the source unauthenticated labels get, and counted.
        _, y, sources, _ = store.feedback.feedback_rows("digits")
        assert y.tolist() == [0, 7] and sources.tolist() == ["anonymous", "anonymous"]
        stats = sorted(
            (s.source, s.predicted, s.target, s.confidence) for s in store.feedback.source_stats("digits")
        )
        assert stats == [("anonymous", 0, 0, 99), ("anonymous", 1, 7, 99)]
        # And new labels go in beside it.
        store.predictions.record([rec("new")])
        assert store.feedback.add_feedback(
            "digits", [FeedbackItem("new", [0])], source="team-a"
        ).accepted == ["new"]
        assert set(store.feedback.label_sources("digits")) == {"anonymous", "team-a"}
        # The old prediction now takes a second source's label beside the first one.
        assert store.feedback.add_feedback(
            "digits", [FeedbackItem("old", [0, 1])], source="team-b"
        ).accepted == ["old"]
    finally:
        store.close()
    # A second opening finds nothing left to upgrade and counts nothing twice.
    store = open_stores(store_url)
    try:
        assert sum(s.labels for s in store.feedback.source_stats("digits")) == 5
    finally:
        store.close()


class _LockedCursor:
    """A cursor whose WAL switch finds the file locked ``locked`` times (or forever)."""

    def __init__(self, locked: int, message: str = "database is locked") -> None:
        self.locked = locked
        self.message = message
        self.calls = 0

    def execute(self, sql: str) -> None:
        assert sql == "PRAGMA journal_mode=WAL"
        self.calls += 1
        if self.calls <= self.locked:
            raise sqlite3.OperationalError(self.message)


def test_the_wal_switch_waits_for_another_process_lock() -> None:
    # Two workers that create the file together: SQLite says "locked" at once, without its
    # busy handler, when waiting could deadlock them; the switch retries instead.
    cursor = _LockedCursor(locked=3)
    _switch_to_wal(cursor)  # type: ignore[arg-type]
    assert cursor.calls == 4


def test_the_wal_switch_gives_up_on_other_errors_and_after_the_busy_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = _LockedCursor(locked=1, message="disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        _switch_to_wal(other)  # type: ignore[arg-type]
    assert other.calls == 1
    monkeypatch.setattr("modelloop.monitoring.stores.engine._SQLITE_BUSY_TIMEOUT_S", 0.2)
    forever = _LockedCursor(locked=10**6)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _switch_to_wal(forever)  # type: ignore[arg-type]
    # It retried, and gave up long before the million locked answers ran out.
    assert 1 < forever.calls < 10**6


def test_two_processes_create_one_store_together(tmp_path: Path) -> None:
    # What `serve --workers 2` does at its first start: both open a file that does not exist.
    script = (
        "import sys, time\n"
        "from modelloop.monitoring.stores import open_stores\n"
        "start = float(sys.argv[2])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "open_stores('sqlite:///' + sys.argv[1]).close()\n"
    )
    for i in range(4):
        db = tmp_path / f"s{i}" / "modelloop.db"
        start = str(time.time() + 1.0)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(db), start], stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
