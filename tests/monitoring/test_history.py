"""History: points stored per evaluation (SQLite and PostgreSQL), retention, traffic from the
registry, the service's estimate and quality gauges, and the history and health routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from modelloop.control.http import create_health_router, render_health_fragment
from modelloop.control.service import MonitoringService
from modelloop.monitoring.history import HistoryPoint, TrafficMeter, _quantile
from modelloop.monitoring.settings import MonitoringSettings
from modelloop.monitoring.stores import Stores, open_stores
from modelloop.monitoring.stores.engine import StoreUnavailable
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.rest.errors import install_error_handlers
from modelloop.serving.types import ModelState
from modelloop.training.baseline import build_baseline
from tests.monitoring.monhelpers import DigitsData, FakeCatalog, drifted_digits, logged, write_version
from tests.monitoring.test_service import pair


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'history.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_stores(url)
    try:
        yield opened
    finally:
        opened.close()


def _point(model: str, version: int, t: float, accuracy: float) -> HistoryPoint:
    return HistoryPoint(model, version, t, {"accuracy": accuracy, "top_drifted_features": [{"feature": "a"}]})


def test_points_round_trip_per_version_oldest_first(store: Stores) -> None:
    store.history.record_history([_point("digits", v, 100.0 + i, i / 10) for v in (1, 2) for i in range(5)])
    store.history.record_history(
        [_point("other", 1, 100.0, 0.5), _point("digits", 1, 100.0, 0.99)]
    )  # repeat kept first
    found = store.history.history("digits", since=101.0, limit=3)
    assert sorted(found) == [1, 2]
    assert [p.t for p in found[1]] == [102.0, 103.0, 104.0]  # the newest 3, oldest first
    assert found[1][-1].values == {"accuracy": 0.4, "top_drifted_features": [{"feature": "a"}]}
    assert store.history.history("digits", since=0.0, limit=10)[1][0].values["accuracy"] == 0.0
    assert store.history.history("nothing", since=0.0, limit=10) == {}


def test_retention_bounds_age_and_points_per_version(store: Stores) -> None:
    now = 1_000_000.0
    store.history.record_history([_point("digits", 1, now - 86400 * 3, 0.1)])
    store.history.record_history([_point("digits", 1, now - i, 0.5) for i in range(10)])
    store.history.record_history([_point("digits", 2, now - i, 0.5) for i in range(3)])
    deleted = store.history.prune_history(retention_days=2, max_points=4, now=now)
    assert deleted == 1 + 6
    found = store.history.history("digits", since=0.0, limit=100)
    assert [p.t for p in found[1]] == [now - 3, now - 2, now - 1, now]
    assert len(found[2]) == 3


def test_a_closed_store_is_unavailable_for_history(tmp_path: Path) -> None:
    closed = open_stores(f"sqlite:///{tmp_path / 'h.db'}")
    closed.close()
    with pytest.raises(StoreUnavailable):
        closed.history.history("digits", since=0.0, limit=1)


def test_quantile_as_prometheus_computes_it() -> None:
    # 100 requests: 90 within 0.01 s, 9 more within 0.1 s, 1 above: p99 sits at the 0.1 edge.
    buckets = {0.01: 90.0, 0.1: 99.0, 1.0: 100.0, float("inf"): 100.0}
    assert _quantile(0.99, buckets) == pytest.approx(0.1)
    assert _quantile(0.5, buckets) == pytest.approx(0.01 * 50 / 90)
    assert _quantile(0.99, {0.01: 0.0, float("inf"): 0.0}) is None
    assert _quantile(0.99, {0.5: 1.0, float("inf"): 10.0}) == 0.5  # the +Inf bucket


def test_traffic_meter_differences_the_serving_counters() -> None:
    registry = CollectorRegistry()
    serving = ServingMetrics(registry)
    meter = TrafficMeter(registry)
    assert meter.measure(now=0.0) == {}
    for _ in range(18):
        serving.observe_request("digits", 1, "v2_rest", "OK", 0.004)
    serving.observe_request("digits", 1, "v2_rest", "INTERNAL", 0.2)
    serving.observe_request("digits", 1, "v2_rest", "INVALID_ARGUMENT", 0.001)  # the client's fault
    serving.observe_request("digits", None, "v2_rest", "NOT_FOUND", 0.001)  # no version resolved
    report = meter.measure(now=10.0)[("digits", 1)]
    assert report.request_rate == pytest.approx(2.0)
    assert report.error_rate == pytest.approx(0.05)
    assert report.p99_seconds is not None and 0.1 < report.p99_seconds <= 0.25
    idle = meter.measure(now=20.0)[("digits", 1)]
    assert idle.request_rate == 0.0 and idle.error_rate is None and idle.p99_seconds is None


# -- the service -------------------------------------------------------------------------


@pytest.fixture
def calibrated(digits_data: DigitsData) -> dict:
    """A digits baseline with a calibrator (a softened one-hot "model": 0.9 on the label)."""
    outputs = np.full((len(digits_data.y_ref), 10), 0.1 / 9)
    outputs[np.arange(len(digits_data.y_ref)), digits_data.y_ref] = 0.9
    return build_baseline(
        x_train=digits_data.x_ref,
        feature_names=[f"pixel_{i // 8}_{i % 8}" for i in range(64)],
        input_name="pixels",
        task="multiclass",
        val_outputs=outputs,
        class_labels=[str(i) for i in range(10)],
        seed=0,
        val_targets=digits_data.y_ref,
    )


@pytest.fixture
def service(tmp_path: Path, calibrated: dict, digits_data: DigitsData) -> Iterator[MonitoringService]:
    repo = tmp_path / "repo"
    write_version(repo, "digits", 1, calibrated)
    write_version(repo, "digits", 2, digits_data.baseline)  # no calibrator: an older baseline
    catalog = FakeCatalog({"digits": {1: ModelState.AVAILABLE, 2: ModelState.AVAILABLE}})
    settings = MonitoringSettings(state_dir=tmp_path / "state", min_rows=100, eval_interval_s=0.05)
    svc = MonitoringService(settings, repo=repo, catalog=catalog, registry=CollectorRegistry())
    try:
        yield svc
    finally:
        svc.stores.close()


def _send(svc: MonitoringService, rows: np.ndarray, version: int, prefix: str) -> None:
    for i in range(0, len(rows), 10):
        svc.recorder.write([logged(*pair(rows[i : i + 10], f"{prefix}{i}", version=version))])


def test_evaluation_exports_estimate_and_quality_and_records_history(
    service: MonitoringService, digits_data: DigitsData
) -> None:
    registry = service.traffic.registry
    v1, v2 = {"model": "digits", "version": "1"}, {"model": "digits", "version": "2"}
    _send(service, digits_data.x_new[:50], 1, "a")
    service.evaluate_once()
    assert service.status("digits")[1].estimate_note == "collecting (50/100 rows)"
    assert registry.get_sample_value("modelloop_estimated_accuracy", v1) is None

    rows = digits_data.x_new[50:250].copy()
    rows[:40, 10] = np.nan
    _send(service, rows, 1, "b")
    _send(service, digits_data.x_new[:200], 2, "c")
    service.evaluate_once()
    report = service.status("digits")[1]
    # pair() answers one-hot outputs (certainty); the calibrator trained on 0.9-confident
    # rows that were always right keeps them near 1.
    assert report.estimate is not None and report.estimate.rows == 250
    assert registry.get_sample_value("modelloop_estimated_accuracy", v1) == pytest.approx(
        report.estimate.value
    )
    assert registry.get_sample_value("modelloop_estimated_accuracy_lower", v1) <= report.estimate.value
    assert registry.get_sample_value(
        "modelloop_feature_missing_share", {**v1, "feature": "pixel_1_2"}
    ) == pytest.approx(40 / 250)
    assert registry.get_sample_value("modelloop_features_became_constant", v1) == 0
    # The older baseline: no estimate, said plainly; data quality still works.
    old = service.status("digits")[2]
    assert old.estimate is None and "no calibrator" in old.estimate_note
    assert registry.get_sample_value("modelloop_estimated_accuracy", v2) is None
    assert (
        registry.get_sample_value("modelloop_feature_out_of_range_share", {**v2, "feature": "pixel_0_0"}) == 0
    )

    _send(service, drifted_digits(digits_data.x_new[300:700]), 1, "d")
    service.evaluate_once()
    drifted = service.status("digits")[1]
    assert drifted.quality is not None and drifted.quality.max_out_of_range_share > 0.3
    assert len(drifted.histograms) == 3
    assert all(not h.name.startswith("pixel_0_0") for h in drifted.histograms)  # varied features first

    history = service.history("digits", since=0.0, limit=100)
    assert [len(history[v]) for v in (1, 2)] == [3, 3]  # one point per evaluation
    first, _, last = history[1]
    assert first["estimated_accuracy"] is None and first["drift_share"] is None
    assert last["drift_share"] > 0.5 and last["drift_detected"] is True
    assert last["out_of_range_share"] > 0.3 and last["top_drifted_features"]
    assert last["estimated_accuracy"] is not None and last["window_rows"] == 650
    assert {"accuracy", "request_rate", "error_rate", "p99_seconds", "missing_share"} <= set(last)


# -- the routes ----------------------------------------------------------------------------


async def _get(service: MonitoringService | None, url: str) -> httpx.Response:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(create_health_router(service))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        return await c.get(url)


async def test_history_route_answers_the_series(service: MonitoringService, digits_data: DigitsData) -> None:
    _send(service, digits_data.x_new[:200], 1, "a")
    service.evaluate_once()
    service.evaluate_once()
    r = await _get(service, "/monitoring/models/digits/history?since=0&limit=1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits"
    assert [s["version"] for s in body["series"]] == [1, 2]
    point = body["series"][0]["points"][0]
    assert set(point) >= {"t", "accuracy", "estimated_accuracy", "drift_share", "prediction_drift"}
    r = await _get(service, "/monitoring/models/digits/history?since=99999999999")
    assert r.status_code == 200 and r.json()["series"] == []


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("/monitoring/models/digits/history?since=yesterday", 400, "'since' must be a number"),
        ("/monitoring/models/digits/history?since=nan", 400, "'since' must be a number"),
        ("/monitoring/models/digits/history?since=-5", 400, "'since' must be a number"),
        ("/monitoring/models/digits/history?limit=0", 400, "'limit' must be an integer in 1..10000"),
        ("/monitoring/models/digits/history?limit=2.5", 400, "'limit' must be an integer"),
        ("/monitoring/models/nope/history", 404, "model 'nope' is not in the repository"),
        ("/monitoring/health?minutes=0", 400, "'minutes' must be an integer in 1..1440"),
    ],
)
async def test_bad_history_requests_are_4xx_naming_the_problem(
    service: MonitoringService, url: str, status: int, message: str
) -> None:
    r = await _get(service, url)
    assert r.status_code == status and message in r.json()["error"], r.text


async def test_routes_without_monitoring_or_store() -> None:
    r = await _get(None, "/monitoring/models/digits/history")
    assert r.status_code == 501 and "monitoring is disabled" in r.json()["error"]


async def test_a_store_outage_is_a_503(service: MonitoringService) -> None:
    service.stores.close()
    r = await _get(service, "/monitoring/models/digits/history")
    assert r.status_code == 503 and r.json()["error"].startswith("history store unavailable")


def test_health_fragment_draws_every_series_with_text_labels(
    service: MonitoringService, digits_data: DigitsData
) -> None:
    _send(service, digits_data.x_new[:200], 1, "a")
    service.evaluate_once()
    _send(service, drifted_digits(digits_data.x_new[200:600]), 1, "b")
    service.evaluate_once()
    fragment = render_health_fragment(service, 1800.0)
    for title in (
        "Accuracy: labelled and estimated without labels",
        "Share of drifted features",
        "Prediction drift (PSI)",
        "Data quality: worst feature",
        "Requests per second",
        "Server error rate",
        "p99 latency (ms)",
    ):
        assert f'aria-label="{title}"' in fragment, title
    assert "v1 estimated" in fragment and "v1 out of range" in fragment  # labels, not colour alone
    assert "baseline (outlined) beside current (filled)" in fragment
    # The prediction-drift chart marks where ModelPredictionDrift fires.
    drift_chart = fragment.split('aria-label="Prediction drift (PSI)"', 1)[1].split("</svg>", 1)[0]
    assert 'class="tick">alert</text>' in drift_chart
    assert "no calibrator" in fragment  # version 2 says why it has no estimate
    assert "<script" not in fragment and "http" not in fragment.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
