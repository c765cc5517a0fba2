"""A real ``modelloop serve`` process: labels survive kill -9; the status page in Chromium;
drift on normal and drifted digits traffic through the served model."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelloop.monitoring.stores import open_stores
from tests.e2e.serverproc import ServerProcess, start_server, wait_for
from tests.monitoring.monhelpers import drifted_digits
from tests.tools import dump_dom, require_chromium

FAST_EVAL = {
    "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "0.2",
    "MODELLOOP_MONITORING_MIN_ROWS": "100",
    "MODELLOOP_MONITORING_MIN_LABELS": "20",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> Path:
    copy = tmp_path_factory.mktemp("monitored") / "repo"
    shutil.copytree(digits_repo, copy, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    return copy


@pytest.fixture(scope="module")
def digits_split() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(7).permutation(len(x))
    return x[order].astype(np.float32), y[order]


def predict(url: str, rows: np.ndarray) -> str:
    r = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": rows.tolist()}, timeout=10)
    r.raise_for_status()
    return r.headers["x-request-id"]


def metric(url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Every server a test starts; each is stopped by its PID even when the test fails."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop(signal.SIGKILL, timeout=10)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_acknowledged_labels_survive_kill_9(
    request: pytest.FixtureRequest,
    backend: str,
    repo: Path,
    tmp_path: Path,
    digits_split: tuple[np.ndarray, np.ndarray],
    servers: list[ServerProcess],
):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'modelloop.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    x, y = digits_split
    server = start_server(repo, "--store", url)
    servers.append(server)
    feedback = []
    for i in range(0, 60, 3):
        rid = predict(server.rest_url, x[i : i + 3])
        feedback.append({"request_id": rid, "targets": y[i : i + 3].tolist()})
    r = httpx.post(f"{server.rest_url}/v1/models/digits/feedback", json={"feedback": feedback}, timeout=10)
    assert r.status_code == 200 and len(r.json()["accepted"]) == 20, r.text
    server.stop(signal.SIGKILL)  # at once: no drain, no clean close of the database

    again = start_server(repo, "--store", url)
    servers.append(again)
    r = httpx.post(f"{again.rest_url}/v1/models/digits/feedback", json={"feedback": feedback}, timeout=10)
    assert r.status_code == 409 and sorted(r.json()["duplicate"]) == sorted(f["request_id"] for f in feedback)
    store = open_stores(url)
    try:
        assert store.feedback.count_labels("digits", 1) == 60
        _, targets = store.feedback.feedback_dataset("digits")
        assert sorted(targets.tolist()) == sorted(y[:60].tolist())
    finally:
        store.close()


def test_status_page_and_drift_through_the_served_model(
    repo: Path, tmp_path: Path, digits_split: tuple[np.ndarray, np.ndarray], servers: list[ServerProcess]
):
    require_chromium()
    x, y = digits_split
    server = start_server(repo, "--state-dir", str(tmp_path / "state"), env=FAST_EVAL)
    servers.append(server)
    url = server.rest_url
    labels = {"model": "digits", "version": "1"}

    # Normal traffic, labelled.
    feedback = []
    for i in range(0, 600, 10):
        feedback.append({"request_id": predict(url, x[i : i + 10]), "targets": y[i : i + 10].tolist()})
    r = httpx.post(f"{url}/v1/models/digits/feedback", json={"feedback": feedback}, timeout=10)
    assert r.status_code == 200 and len(r.json()["accepted"]) == 60
    assert wait_for(lambda: metric(url, "modelloop_accuracy", **labels) is not None, timeout=20)
    assert wait_for(lambda: metric(url, "modelloop_monitoring_window_rows", **labels) == 600, timeout=20)
    assert wait_for(lambda: metric(url, "modelloop_drift_share", **labels) is not None, timeout=20)
    normal = {
        "drift_detected": metric(url, "modelloop_drift_detected", **labels),
        "share": metric(url, "modelloop_drift_share", **labels),
        "prediction_psi": metric(url, "modelloop_prediction_drift", **labels),
        "accuracy": metric(url, "modelloop_accuracy", **labels),
        "pixel_3_3 psi": metric(url, "modelloop_feature_drift", feature="pixel_3_3", method="psi", **labels),
    }

    dom = dump_dom(f"{url}/")
    assert "digits" in dom and "AVAILABLE" in dom and "accuracy 0." in dom and "600 labels" in dom
    assert 'href="/metrics"' in dom and 'href="/docs"' in dom

    # Drifted traffic (inverted pixels plus noise) replaces the 1000-row window.
    bad = drifted_digits(x[600:1600], seed=1)
    for i in range(0, len(bad), 25):
        predict(url, bad[i : i + 25])
    assert wait_for(lambda: metric(url, "modelloop_drift_detected", **labels) == 1.0, timeout=20)
    assert wait_for(lambda: metric(url, "modelloop_monitoring_window_rows", **labels) == 1000, timeout=20)
    drifted = {
        "drift_detected": metric(url, "modelloop_drift_detected", **labels),
        "share": metric(url, "modelloop_drift_share", **labels),
        "prediction_psi": metric(url, "modelloop_prediction_drift", **labels),
        "pixel_3_3 psi": metric(url, "modelloop_feature_drift", feature="pixel_3_3", method="psi", **labels),
    }
    print(f"\nserved digits, normal traffic (600 rows): {normal}")
    print(f"served digits, drifted traffic (1000 rows, 16-x plus noise): {drifted}")
    assert normal["drift_detected"] == 0.0 and normal["share"] < 0.2 and normal["prediction_psi"] < 0.1
    assert normal["accuracy"] > 0.9
    assert drifted["share"] > 0.8 and drifted["prediction_psi"] > 0.5
    dom = dump_dom(f"{url}/")
    assert "DRIFT" in dom
