"""The prediction log as segment objects (a local directory, and S3 through moto's server):
names, atomic objects, the reader's cursor across restarts, late objects, two writers and
one reader, export, and a bucket that cannot be written."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry, Counter

from modelloop.monitoring.ingest import LogIngest
from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.predlog_objects import SUFFIX, ObjectCursor, ObjectPredictionLog, key_time, time_key
from modelloop.monitoring.predlog_store import export_parquet
from modelloop.monitoring.recorder import LogRecorder, VersionInfo
from modelloop.monitoring.stores import Stores, StoreUnavailable, open_stores
from modelloop.monitoring.window import WindowSet
from modelloop.serving.predlog import LogColumns, PredictionLogger, encode_batch, encode_segment
from modelloop.serving.types import InferRequest, InferResponse, Protocol
from tests.s3server import S3Server

BUCKET = "logs"
COLUMNS = LogColumns("pixels", "probabilities")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server.start(tmp_path_factory.mktemp("moto")) as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(params=["directory", "s3"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "directory":
        return f"file://{tmp_path / 'log'}"
    s3: S3Server = request.getfixturevalue("s3")
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{BUCKET}/{request.node.name[:40].replace('[', '-').replace(']', '')}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Stores]:
    s = open_stores(f"sqlite:///{tmp_path / 'state' / 'modelloop.db'}")
    try:
        yield s
    finally:
        s.close()


def _segment(prefix: str, n: int, *, t: float | None = None, model: str = "digits") -> bytes:
    items = [
        (
            model,
            1,
            f"{prefix}{i}",
            time.time() if t is None else t,
            0.001,
            {"pixels": np.full((1, 4), float(i), np.float32)},
            {"probabilities": np.eye(3, dtype=np.float32)[[i % 3]]},
        )
        for i in range(n)
    ]
    batch = encode_batch(items, COLUMNS)
    assert batch is not None
    return encode_segment([batch])


def _reader(log: ObjectPredictionLog, store: Stores) -> tuple[LogIngest, WindowSet]:
    metrics = MonitoringMetrics(CollectorRegistry())
    windows = WindowSet(100_000)
    recorder = LogRecorder(store.predictions, windows, lambda m, v: VersionInfo("multiclass", 3))
    return LogIngest(log, recorder, metrics), windows


def _stored_ids(store: Stores) -> list[str]:
    return store.engine.transaction(
        lambda conn: [str(r) for (r,) in conn.exec_driver_sql("SELECT request_id FROM predictions")],
        write=False,
    )


def _answer(logger: PredictionLogger, rid: str) -> None:
    x = np.full((1, 4), float(len(rid)), np.float32)
    y = np.eye(3, dtype=np.float32)[[len(rid) % 3]]
    logger.observe(
        InferRequest("digits", {"pixels": x}, Protocol.V2_REST, id=rid),
        InferResponse("digits", 1, {"probabilities": y}, id=rid, seconds=0.001),
    )


def test_keys_sort_by_time_and_name_the_writer() -> None:
    t = 1_796_000_000.25
    assert time_key(t) < time_key(t + 0.000_001) < time_key(t + 3600)
    assert key_time(time_key(t) + "-host-1-abc-000001" + SUFFIX) == pytest.approx(t, abs=1e-6)
    assert time_key(t) == "2026113000/53/20261130T005320.250000Z"  # hour and minute prefixes (UTC)


def test_segments_are_read_once_in_order_and_the_cursor_survives_a_restart(
    log_url: str, store: Stores
) -> None:
    writer = ObjectPredictionLog(log_url)
    for n in range(3):
        writer.append(_segment(f"s{n}-", 2), rows=2)
    log = ObjectPredictionLog(log_url, store=store.engine)
    assert log.cursor() == ObjectCursor() and log.last().key.endswith(f"-000003{SUFFIX}")
    first = log.read(log.cursor(), limit=2)
    assert [p.key.rsplit("-", 1)[1] for p, _ in first] == [f"000001{SUFFIX}", f"000002{SUFFIX}"]
    log.advance(first[-1][0])
    # A new process (a restarted control plane) continues from the persisted keys.
    again = ObjectPredictionLog(log_url, store=store.engine)
    rest = again.read(again.cursor())
    assert len(rest) == 1 and rest[0][0].key.endswith(f"-000003{SUFFIX}")
    assert again.reached(rest[0][0], again.last()) and not again.reached(first[-1][0], again.last())

    ingest, windows = _reader(ObjectPredictionLog(log_url, store=store.engine), store)
    assert ingest.catch_up(timeout=10)
    assert sorted(_stored_ids(store)) == ["s2-0", "s2-1"]  # s0 and s1 were read before
    assert ingest.stored == 2 and len(windows.get("digits", 1).snapshot()[0]) == 2
    restarted, _ = _reader(ObjectPredictionLog(log_url, store=store.engine), store)
    assert restarted.catch_up(timeout=10) and restarted.stored == 0


def test_a_half_written_object_is_never_read_and_an_undecodable_one_is_skipped(
    tmp_path: Path, store: Stores
) -> None:
    root = tmp_path / "log"
    writer = ObjectPredictionLog(f"file://{root}")
    writer.append(_segment("a", 2), rows=2)
    (folder,) = {p.parent for p in root.rglob(f"*{SUFFIX}")}
    stamp = time_key(time.time()).rsplit("/", 1)[1]
    (folder / f".{stamp}-other-1-x-000001{SUFFIX}.tmp").write_bytes(b"half")  # being written
    (folder / f"{stamp}-other-1-x-000002{SUFFIX}").write_bytes(b"garbage")
    (folder / f"notes-{stamp}{SUFFIX}").write_bytes(b"not a segment name")
    writer.append(_segment("b", 1), rows=1)
    ingest, _ = _reader(ObjectPredictionLog(f"file://{root}", store=store.engine), store)
    assert ingest.catch_up(timeout=10)
    assert sorted(_stored_ids(store)) == ["a0", "a1", "b0"] and ingest.skipped == 1


def test_read_hours_past_their_retention_are_deleted(log_url: str, store: Stores) -> None:
    log = ObjectPredictionLog(log_url, store=store.engine, retention_s=3600.0)
    old = time.time() - 3 * 3600
    log._put(f"{time_key(old)}-old-1-x-000001{SUFFIX}", _segment("old", 1))
    log.append(_segment("new", 1), rows=1)
    unread = log.cursor()
    assert log.prune(unread) == 0  # nothing read yet: nothing goes
    ingest, _ = _reader(log, store)
    assert ingest.catch_up(timeout=10) and sorted(_stored_ids(store)) == ["new0", "old0"]
    assert log.prune(ingest.cursor) == 1
    assert [len(list(log.segments_since(0)))] == [1]


def test_a_late_object_is_read_within_the_grace_window(log_url: str, store: Stores) -> None:
    now = time.time()
    log = ObjectPredictionLog(log_url, store=store.engine, grace_s=60.0)
    early, late = _segment("early", 1), _segment("late", 1)
    log.append(_segment("new", 1), rows=1)
    ingest, _ = _reader(log, store)
    assert ingest.catch_up(timeout=10) and _stored_ids(store) == ["new0"]
    # A slower writer's objects land after the newer one was read: 10 s and 10 min older.
    for t, payload, name in ((now - 10, early, "slow"), (now - 600, late, "slower")):
        key = f"{time_key(t)}-{name}-1-x-000001{SUFFIX}"
        log._put(key, payload)
    assert ingest.catch_up(timeout=10)
    assert sorted(_stored_ids(store)) == ["early0", "new0"]  # past the grace window: not read


def test_two_writers_and_one_reader_lose_nothing_and_count_nothing_twice(log_url: str, store: Stores) -> None:
    per_writer = 400
    loggers = [
        PredictionLogger(ObjectPredictionLog(log_url), columns=lambda m, v: COLUMNS, flush_interval_s=0.02)
        for _ in range(2)
    ]
    ingest, windows = _reader(ObjectPredictionLog(log_url, store=store.engine), store)
    for logger in loggers:
        logger.start()
    ingest.interval_s = 0.01
    ingest.start()

    def serve(index: int, logger: PredictionLogger) -> None:
        for i in range(per_writer):
            _answer(logger, f"w{index}-{i}")
            if i % 50 == 0:
                logger.flush(timeout=10)

    threads = [threading.Thread(target=serve, args=(i, lg)) for i, lg in enumerate(loggers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(logger.flush(timeout=30) for logger in loggers)
        assert ingest.catch_up(timeout=30)
    finally:
        ingest.stop()
        for logger in loggers:
            logger.stop()
    ids = _stored_ids(store)
    assert len(ids) == len(set(ids)) == 2 * per_writer
    assert ingest.stored == 2 * per_writer  # what the reader handed on, each request once
    assert len(windows.get("digits", 1).snapshot()[0]) == 2 * per_writer
    assert sum(lg.segments for lg in loggers) >= 2 and all(lg.dropped == 0 for lg in loggers)


def test_export_reads_objects_as_parquet(log_url: str, tmp_path: Path) -> None:
    log = ObjectPredictionLog(log_url)
    log.append(_segment("new", 3), rows=3)
    log.append(_segment("x", 2, model="other"), rows=2)
    out = tmp_path / "digits.parquet"
    assert export_parquet(log, "digits", time.time() - 60, out) == 3
    assert sorted(pq.read_table(out).column("request_id").to_pylist()) == ["new0", "new1", "new2"]
    assert export_parquet(log, "digits", time.time() + 3600, out) == 0


def test_the_logger_gathers_seconds_of_traffic_per_object_and_flush_ends_one(tmp_path: Path) -> None:
    root = tmp_path / "log"
    logger = PredictionLogger(
        ObjectPredictionLog(f"file://{root}"),
        columns=lambda m, v: COLUMNS,
        flush_interval_s=0.01,
        segment_s=3600,
    )
    logger.start()
    try:
        for i in range(20):
            _answer(logger, f"r{i}")
        assert logger.pending == 20  # nothing written until the segment ends...
        assert logger.flush(timeout=10)  # ...or a flush ends it
    finally:
        logger.stop()
    objects = sorted(root.rglob(f"*{SUFFIX}"))
    assert len(objects) == 1 and logger.segments == 1


def test_an_unreachable_bucket_buffers_to_a_bound_drops_counted_and_resumes(
    s3: S3Server, store: Stores, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    url = "s3://logs-not-yet/prefix"  # no such bucket: every write fails until it exists
    registry = CollectorRegistry()
    dropped = Counter("modelloop_monitoring_dropped", "dropped", ["model"], registry=registry)
    logger = PredictionLogger(
        ObjectPredictionLog(url),
        columns=lambda m, v: COLUMNS,
        on_drop=lambda model, n: dropped.labels(model=model).inc(n),
        flush_interval_s=0.01,
        max_pending_segments=2,
    )
    logger.start()
    try:
        with caplog.at_level(logging.WARNING, logger="modelloop.serving.predlog"):
            for i in range(5):
                _answer(logger, f"lost{i}")  # observe returns at once: serving goes on
                assert not logger.flush(timeout=0.5)  # one segment per flush, kept while it fails
        warnings = [r for r in caplog.records if "prediction log unavailable" in r.getMessage()]
        assert len(warnings) == 1  # once per interval, not once per attempt
        assert logger.dropped >= 3
        assert registry.get_sample_value("modelloop_monitoring_dropped_total", {"model": "digits"}) == (
            logger.dropped
        )
        s3.client().create_bucket(Bucket="logs-not-yet")
        _answer(logger, "after")
        assert logger.flush(timeout=30)  # the bucket is back: what was kept is written
    finally:
        logger.stop()
    ingest, _ = _reader(ObjectPredictionLog(url, store=store.engine), store)
    assert ingest.catch_up(timeout=10)
    ids = _stored_ids(store)
    assert "after" in ids and len(ids) + logger.dropped == 6


def test_a_reader_of_an_unreachable_bucket_raises_store_unavailable(
    s3: S3Server, store: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.env(AWS_SECRET_ACCESS_KEY="wrong").items():
        monkeypatch.setenv(name, value)
    log = ObjectPredictionLog(f"s3://{BUCKET}/refused", store=store.engine)
    with pytest.raises(StoreUnavailable, match="cannot list"):
        log.read(log.cursor())
    ingest, _ = _reader(log, store)
    assert not ingest.catch_up(timeout=1)
