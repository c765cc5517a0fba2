"""The recorder (the log's requests stored and windowed) and the service (evaluation, gauges, listeners)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelloop.control.service import MonitoringService
from modelloop.monitoring.recorder import LogRecorder, VersionInfo, predicted_values
from modelloop.monitoring.report import EvaluationReport
from modelloop.monitoring.settings import MonitoringSettings, resolve_model_settings
from modelloop.monitoring.stores import open_stores
from modelloop.monitoring.stores.engine import StoreUnavailable
from modelloop.monitoring.stores.records import FeedbackItem, PredictionRecord
from modelloop.monitoring.window import WindowSet
from modelloop.serving.settings import ModelConfig
from modelloop.serving.types import InferRequest, InferResponse, ModelState, Protocol
from tests.monitoring.monhelpers import DigitsData, FakeCatalog, drifted_digits, logged, write_version


def pair(
    rows: np.ndarray, rid: str, model: str = "digits", version: int = 1, classes: np.ndarray | None = None
):
    probs = np.zeros((len(rows), 10), np.float32)
    probs[np.arange(len(rows)), classes if classes is not None else 0] = 1.0
    return (
        InferRequest(
            model=model, inputs={"pixels": rows.astype(np.float32)}, protocol=Protocol.V2_REST, id=rid
        ),
        InferResponse(model=model, version=version, outputs={"probabilities": probs}, id=rid),
    )


class BlockingStore:
    """Blocks in record() until released; counts what it got."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.records: list[PredictionRecord] = []
        self.fail = False

    def record(self, records: Sequence[PredictionRecord]) -> None:
        self.release.wait(10)
        if self.fail:
            raise StoreUnavailable("down")
        self.records.extend(records)


def test_a_store_outage_adds_nothing_so_the_batch_is_read_again():
    store = BlockingStore()
    store.fail = True
    store.release.set()
    windows = WindowSet(1000)
    recorder = LogRecorder(store, windows, lambda m, v: VersionInfo())
    batch = [logged(*pair(np.ones((3, 64)), "a"))]
    with pytest.raises(StoreUnavailable):
        recorder.write(batch)
    # The windows take rows only once the store has them: the reader's retry counts them once.
    assert len(windows.get("digits", 1)) == 0
    store.fail = False
    assert recorder.write(batch) == 1
    assert len(windows.get("digits", 1)) == 3 and [r.request_id for r in store.records] == ["a"]


def test_a_batch_is_converted_per_version_and_logs_what_each_request_sent():
    store = BlockingStore()
    store.release.set()
    windows = WindowSet(1000)
    recorder = LogRecorder(store, windows, lambda m, v: VersionInfo(classes=10), sample_features=64)
    rng = np.random.default_rng(0)
    wide = [rng.integers(0, 17, size=(n, 70)).astype(np.float32) for n in (1, 3, 2)]
    requests = [pair(rows, f"w{i}", classes=np.full(len(rows), i)) for i, rows in enumerate(wide)]
    requests.append(pair(np.ones((2, 64)), "v2", version=2, classes=np.array([7, 8])))
    narrow = pair(np.ones((1, 10)), "odd", version=2, classes=np.array([5]))  # another width, same version
    assert recorder.write([logged(request, response) for request, response in [*requests, narrow]]) == 5
    stored = {r.request_id: r for r in store.records}
    assert sorted(stored) == ["odd", "v2", "w0", "w1", "w2"]
    for i, rows in enumerate(wide):
        record = stored[f"w{i}"]
        # The first 64 of 70 columns of exactly this request's rows, and its predictions.
        np.testing.assert_array_equal(np.asarray(record.inputs), rows[:, :64].astype(np.float64))
        assert list(record.predicted) == [i] * len(rows)
        assert np.asarray(record.outputs).shape == (len(rows), 10)
    assert list(stored["v2"].predicted) == [7, 8] and list(stored["odd"].predicted) == [5]
    assert len(windows.get("digits", 1)) == 6 and len(windows.get("digits", 2)) == 3


def test_wide_multi_row_requests_round_trip_through_the_store(tmp_path: Path):
    store = open_stores(f"sqlite:///{tmp_path / 'log.db'}")
    recorder = LogRecorder(store.predictions, WindowSet(100), lambda m, v: VersionInfo(classes=10))
    rows = np.arange(3 * 70, dtype=np.float32).reshape(3, 70)
    try:
        recorder.write([logged(*pair(np.zeros((1, 70)), "first"))])
        recorder.write([logged(*pair(rows, "wide", classes=np.array([1, 2, 3])))])
        assert store.feedback.add_feedback("digits", [FeedbackItem("wide", [1, 2, 3])]).accepted == ["wide"]
        inputs, targets = store.feedback.feedback_dataset("digits")
    finally:
        store.close()
    np.testing.assert_array_equal(inputs, rows[:, :64])
    assert targets.tolist() == [1, 2, 3]


def test_predicted_values_per_task():
    out = np.array([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05]])
    assert predicted_values(out, "multiclass").tolist() == [1, 0]
    assert predicted_values(np.array([[0.2], [0.8]]), "binary").tolist() == [0, 1]
    assert predicted_values(np.array([[1.5], [-2.0]]), "regression").tolist() == [1.5, -2.0]


@pytest.fixture
def setup(
    tmp_path: Path, digits_data: DigitsData
) -> Iterator[tuple[MonitoringService, FakeCatalog, CollectorRegistry]]:
    repo = tmp_path / "repo"
    write_version(repo, "digits", 1, digits_data.baseline)
    write_version(repo, "digits", 2, None)  # no baseline
    catalog = FakeCatalog({"digits": {1: ModelState.AVAILABLE, 2: ModelState.AVAILABLE}})
    registry = CollectorRegistry()
    settings = MonitoringSettings(
        state_dir=tmp_path / "state", min_rows=100, min_labels=10, eval_interval_s=0.05
    )
    service = MonitoringService(settings, repo=repo, catalog=catalog, registry=registry)
    try:
        yield service, catalog, registry
    finally:
        service.stores.close()


def _send(
    service: MonitoringService, rows: np.ndarray, classes: np.ndarray, prefix: str, version: int = 1
) -> list[str]:
    ids = []
    for i in range(0, len(rows), 10):
        rid = f"{prefix}{i}"
        service.recorder.write(
            [logged(*pair(rows[i : i + 10], rid, version=version, classes=classes[i : i + 10]))]
        )
        ids.append(rid)
    return ids


def test_evaluation_sets_gauges_and_calls_listeners(setup, digits_data: DigitsData):
    service, _, registry = setup
    seen: list[tuple[str, int, EvaluationReport]] = []
    service.add_listener(lambda m, v, r: seen.append((m, v, r)))

    def broken(m: str, v: int, r: EvaluationReport) -> None:
        raise RuntimeError("a broken rule")

    service.add_listener(broken)
    service.add_listener(lambda m, v, r: seen.append((m, v, r)))
    labels = {"model": "digits", "version": "1"}

    # Below min_rows: no verdict, no drift gauges.
    _send(service, digits_data.x_new[:50], digits_data.y_new[:50], "a")
    reports = service.evaluate_once()
    assert {r.version for r in reports} == {1, 2}
    assert len(seen) == 4  # two listeners x two versions, despite the broken one
    first = service.status("digits")[1]
    assert first.drift is None and first.window_rows == 50
    assert registry.get_sample_value("modelloop_drift_detected", labels) is None
    assert service.status("digits")[2].drift_error.startswith("no baseline.json")

    # Normal traffic: no drift; labels give accuracy.
    ids = _send(service, digits_data.x_new[50:300], digits_data.y_new[50:300], "b")
    targets = digits_data.y_new[50:300].reshape(-1, 10)
    result = service.add_feedback(
        "digits", [FeedbackItem(i, t.tolist()) for i, t in zip(ids, targets, strict=True)]
    )
    assert len(result.accepted) == 25
    service.evaluate_once()
    normal = service.status("digits")[1]
    assert normal.drift is not None and not normal.drift.drifted
    assert registry.get_sample_value("modelloop_drift_detected", labels) == 0
    assert registry.get_sample_value("modelloop_accuracy", labels) == 1.0  # predictions were the labels
    counted = {**labels, "source": "anonymous", "outcome": "accepted"}
    assert registry.get_sample_value("modelloop_feedback_total", counted) == 250
    assert normal.labels == 250 and normal.accuracy is not None and normal.accuracy.rows == 250
    psi_sample = registry.get_sample_value(
        "modelloop_feature_drift", {**labels, "feature": "pixel_2_4", "method": "psi"}
    )
    assert psi_sample is not None and psi_sample < 0.2

    # Drifted traffic fills the window: drift detected.
    bad = drifted_digits(digits_data.x_new[:1000])
    _send(service, bad, np.zeros(len(bad), np.int64), "c")
    service.evaluate_once()
    drifted = service.status("digits")[1]
    assert drifted.drift is not None and drifted.drift.drifted
    assert registry.get_sample_value("modelloop_drift_detected", labels) == 1
    assert registry.get_sample_value("modelloop_prediction_drift", labels) > 1.0
    assert registry.get_sample_value("modelloop_drift_share", labels) > 0.8
    last_v1 = [r for _, v, r in seen if v == 1][-1]
    assert last_v1.drift is not None and last_v1.drift.drifted


def test_unloaded_versions_lose_their_gauges(setup, digits_data: DigitsData):
    service, catalog, registry = setup
    _send(service, digits_data.x_new[:200], digits_data.y_new[:200], "a")
    service.evaluate_once()
    labels = {"model": "digits", "version": "1"}
    assert registry.get_sample_value("modelloop_drift_detected", labels) == 0
    catalog.versions["digits"][1] = ModelState.END
    service.evaluate_once()
    assert registry.get_sample_value("modelloop_drift_detected", labels) is None
    assert (
        registry.get_sample_value(
            "modelloop_feature_drift", {**labels, "feature": "pixel_2_4", "method": "psi"}
        )
        is None
    )
    assert 1 not in service.status("digits")


def test_per_model_thresholds_from_config(setup, digits_data: DigitsData, caplog: pytest.LogCaptureFixture):
    service, catalog, _ = setup
    _send(service, digits_data.x_new[:120], digits_data.y_new[:120], "a")
    catalog.configs["digits"] = ModelConfig(drift={"min_rows": 500})
    service.evaluate_once()
    assert service.status("digits")[1].drift is None and service.status("digits")[1].min_rows == 500
    catalog.configs["digits"] = ModelConfig(drift={"min_rowz": 5})
    service.evaluate_once()
    assert service.status("digits")[1].drift is not None  # bad overrides: server defaults
    assert "min_rowz" in caplog.text


def test_resolve_model_settings():
    base = MonitoringSettings()
    assert resolve_model_settings(base, {}) is base
    resolved = resolve_model_settings(base, {"psi_threshold": 0.1, "accuracy_floor": 0.9})
    assert (
        resolved.psi_threshold == 0.1
        and resolved.accuracy_floor == 0.9
        and resolved.min_rows == base.min_rows
    )
    with pytest.raises(ValueError, match="drift_share"):
        resolve_model_settings(base, {"drift_share": 2})


def test_regressors_export_mae(tmp_path: Path, digits_data: DigitsData):
    repo = tmp_path / "repo"
    write_version(repo, "diabetes", 1, None, task="regression")
    registry = CollectorRegistry()
    store = open_stores(f"sqlite:///{tmp_path / 'm.db'}")
    service = MonitoringService(
        MonitoringSettings(min_labels=2),
        repo=repo,
        catalog=FakeCatalog({"diabetes": {1: ModelState.AVAILABLE}}),
        registry=registry,
        stores=store,
    )
    try:
        request = InferRequest(
            model="diabetes", inputs={"pixels": np.ones((2, 64), np.float32)}, protocol=Protocol.V2_REST
        )
        response = InferResponse(
            "diabetes", 1, {"probabilities": np.array([[10.0], [20.0]], np.float32)}, id="r"
        )
        service.recorder.write([logged(request, response)])
        assert service.add_feedback("diabetes", [FeedbackItem("r", [12.0, 17.0])]).accepted == ["r"]
        report = service.evaluate_once()[0]
        assert report.accuracy is not None and report.accuracy.metric == "mae"
        assert (
            registry.get_sample_value("modelloop_mean_absolute_error", {"model": "diabetes", "version": "1"})
            == 2.5
        )
        assert registry.get_sample_value("modelloop_accuracy", {"model": "diabetes", "version": "1"}) is None
    finally:
        store.close()


async def test_the_loop_runs_and_stops(tmp_path: Path, digits_data: DigitsData):
    repo = tmp_path / "repo"
    write_version(repo, "digits", 1, digits_data.baseline)
    service = MonitoringService(
        MonitoringSettings(state_dir=tmp_path / "state", eval_interval_s=0.02),
        repo=repo,
        catalog=FakeCatalog({"digits": {1: ModelState.AVAILABLE}}),
        registry=CollectorRegistry(),
    )
    seen = threading.Event()
    service.add_listener(lambda m, v, r: seen.set())
    await service.start()
    try:
        service.recorder.write([logged(*pair(np.ones((1, 64)), "x"))])
        for _ in range(200):
            if seen.is_set():
                break
            await asyncio.sleep(0.01)
        assert seen.is_set()
    finally:
        await service.stop()
    # stop() closed the store.
    with pytest.raises(StoreUnavailable):
        service.stores.feedback.count_labels("digits", 1)
