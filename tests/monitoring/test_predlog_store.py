"""The prediction log in SQL and its reader: order, the cursor, restarts, undecodable segments,
and the Parquet export (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from modelloop.monitoring.ingest import LogIngest
from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.predlog_store import SqlPredictionLog, export_parquet
from modelloop.monitoring.recorder import LogRecorder, VersionInfo
from modelloop.monitoring.stores import Stores, open_stores
from modelloop.monitoring.stores.records import FeedbackItem
from modelloop.monitoring.window import WindowSet
from modelloop.serving.predlog import LogColumns, encode_batch, encode_segment


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'modelloop.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = open_stores(url)
    try:
        yield s
    finally:
        s.close()


def _segment(prefix: str, n: int, *, model: str = "digits", t: float | None = None) -> bytes:
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
    batch = encode_batch(items, LogColumns("pixels", "probabilities"))
    assert batch is not None
    return encode_segment([batch])


def _reader(store: Stores, registry: CollectorRegistry) -> tuple[LogIngest, WindowSet]:
    metrics = MonitoringMetrics(registry)
    windows = WindowSet(1000)
    recorder = LogRecorder(store.predictions, windows, lambda m, v: VersionInfo("multiclass", 3))
    log = SqlPredictionLog(store.engine, settle_s=0.0)
    return LogIngest(log, recorder, metrics), windows


def test_segments_are_read_in_order_from_the_cursor(store: Stores) -> None:
    log = SqlPredictionLog(store.engine, settle_s=0.0)
    for n in range(3):
        log.append(_segment(f"s{n}-", 2), rows=2)
    assert log.cursor() == 0 and log.last() == 3
    first = log.read(0, limit=2)
    assert [seq for seq, _ in first] == [1, 2]
    log.advance(2)
    log.advance(1)  # never backwards
    assert log.cursor() == 2
    assert [seq for seq, _ in log.read(log.cursor())] == [3]
    assert log.backlog(2) == (1, 2)


def test_the_reader_stores_once_across_a_restart_and_skips_what_it_cannot_decode(
    store: Stores,
) -> None:
    log = SqlPredictionLog(store.engine, settle_s=0.0)
    log.append(_segment("a", 5), rows=5)
    log.append(b"written by another version", rows=1)
    log.append(_segment("b", 3), rows=3)
    registry = CollectorRegistry()
    ingest, windows = _reader(store, registry)
    assert ingest.catch_up(timeout=10)
    assert ingest.cursor == 3 and ingest.stored == 8 and ingest.skipped == 1
    assert registry.get_sample_value("modelloop_log_segments_skipped_total") == 1
    rows, predicted = windows.get("digits", 1).snapshot()
    assert len(rows) == 8 and sorted(predicted.tolist()) == sorted([i % 3 for i in range(5)] + [0, 1, 2])
    # Labels join what the reader stored.
    assert store.feedback.add_feedback(
        "digits", [FeedbackItem("a4", [1]), FeedbackItem("b0", [0])]
    ).accepted == [
        "a4",
        "b0",
    ]
    # A second reader (a restarted control plane) starts from the persisted cursor...
    log.append(_segment("c", 2), rows=2)
    again, windows2 = _reader(store, CollectorRegistry())
    assert again.catch_up(timeout=10)
    assert again.stored == 2 and len(windows2.get("digits", 1).snapshot()[0]) == 2
    # ...and one that re-reads from the start stores nothing twice.
    store.engine.transaction(lambda conn: conn.exec_driver_sql("UPDATE log_cursors SET seq = 0"), write=True)
    replay, _ = _reader(store, CollectorRegistry())
    assert replay.catch_up(timeout=10)
    count = store.engine.transaction(
        lambda conn: conn.exec_driver_sql("SELECT COUNT(*) FROM predictions").scalar_one(), write=False
    )
    assert count == 10
    assert store.feedback.add_feedback("digits", [FeedbackItem("a4", [2])]).duplicate == ["a4"]


def test_export_writes_parquet_one_row_per_logged_prediction(store: Stores, tmp_path: Path) -> None:
    log = SqlPredictionLog(store.engine, settle_s=0.0)
    log.append(_segment("old", 2, t=1000.0), rows=2)
    log.append(_segment("new", 3), rows=3)
    log.append(_segment("x", 4, model="other"), rows=4)
    out = tmp_path / "out" / "digits.parquet"
    since = time.time() - 3600
    assert export_parquet(log, "digits", since, out) == 3
    table = pq.read_table(out)
    assert table.column("request_id").to_pylist() == ["new0", "new1", "new2"]
    assert table.column("inputs").to_pylist()[2] == [2.0] * 4
    assert export_parquet(log, "digits", 0, out) == 5  # the segment times, then the row times
    assert export_parquet(log, "nope", 0, out) == 0 and pq.read_table(out).num_rows == 0


def test_read_segments_are_pruned_by_age_and_count_unread_ones_never(store: Stores) -> None:
    log = SqlPredictionLog(store.engine, settle_s=0.0, retention_s=3600.0, max_segments=2)
    for n in range(5):
        log.append(_segment(f"p{n}-", 1), rows=1)
    # Nothing read yet: nothing goes, however many there are.
    assert log.prune(0) == 0 and log.last() == 5
    # Read up to 4: 2 of them are kept, and the unread 5th.
    assert log.prune(4) == 2
    assert [seq for seq, _ in log.read(0)] == [3, 4, 5]
    # A day later every read segment is past the retention.
    assert log.prune(4, now=time.time() + 2 * 3600) == 2
    assert [seq for seq, _ in log.read(0)] == [5]


def test_a_control_plane_counts_the_logged_traffic_for_its_history(store: Stores) -> None:
    from modelloop.monitoring.history import LoggedTraffic, TrafficMeter

    traffic = LoggedTraffic()
    metrics = MonitoringMetrics(CollectorRegistry())
    recorder = LogRecorder(store.predictions, WindowSet(100), lambda m, v: VersionInfo("multiclass", 3))
    log = SqlPredictionLog(store.engine, settle_s=0.0)
    ingest = LogIngest(log, recorder, metrics, traffic=traffic)
    meter = TrafficMeter(traffic.registry, errors=False)
    assert meter.measure(now=0.0) == {}
    log.append(_segment("t", 40), rows=40)
    assert ingest.catch_up(timeout=10)
    report = meter.measure(now=10.0)[("digits", 1)]
    assert report.request_rate == pytest.approx(4.0)  # 40 requests in 10 s
    assert report.error_rate is None  # failed requests are not logged: unknown, not 0
    # 0.001 s as float32 is a hair above the 1 ms bound: the 2.5 ms bucket.
    assert report.p99_seconds is not None and 0.001 <= report.p99_seconds <= 0.0025


def test_a_control_plane_counts_its_retrain_runs_where_the_page_reads_them(tmp_path: Path) -> None:
    from modelloop.control.service import MonitoringService
    from modelloop.monitoring.settings import MonitoringSettings
    from modelloop.serving.types import ModelState, VersionStatus

    class Catalog:
        def model_names(self) -> list[str]:
            return ["digits"]

        def has_model(self, name: str) -> bool:
            return name == "digits"

        def statuses(self, name: str) -> list[VersionStatus]:
            return [VersionStatus(1, ModelState.AVAILABLE)]

        def model_options(self, name: str, key: str) -> dict[str, object]:
            return {}

    registry = CollectorRegistry()
    service = MonitoringService(
        MonitoringSettings(state_dir=tmp_path / "state"),
        repo=tmp_path,
        catalog=Catalog(),
        registry=registry,
        reads_log=True,
        traffic_from_log=True,
    )
    try:
        service.metrics.retrain_runs.labels(model="digits", outcome="blessed").inc()
        assert service.retrain_runs("digits") == {"blessed": 1, "rejected": 0, "failed": 0}
    finally:
        service.stores.close()
