"""Serving answers, the control plane watches: two replicas with two workers each, one
``modelloop monitor`` reading their shared prediction log.

- The control plane's drift window holds every replica's and every worker's traffic, and
  its drift share and prediction PSI are those of the whole traffic computed in one place.
- Labels sent to either replica's address are forwarded and join predictions answered by
  the other.
- ``kill -9`` of the control plane under traffic: no client request fails, and after a
  restart every answered request is stored once, and no acknowledged label is lost.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.e2e.serverproc import MonitorProcess, ServerProcess, start_monitor, start_server, wait_for

PLANE_ENV = {
    "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "0.5",
    "MODELLOOP_MONITORING_WINDOW_SIZE": "5000",
    "MODELLOOP_MONITORING_MIN_ROWS": "100",
}
DRIFTED = 600
UNION = "union"


@dataclass
class Fleet:
    repo: Path
    state: Path
    plane: MonitorProcess
    replicas: list[ServerProcess]

    @property
    def db(self) -> Path:
        return self.state / "modelloop.db"


@pytest.fixture(scope="module")
def fleet(digits_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    state, repo = root / "state", root / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    # A model of its own for the drift test, so that the other tests' traffic (in any order)
    # never reaches its window.
    shutil.copytree(repo / "digits", repo / UNION)
    plane = start_monitor(repo, "--state-dir", str(state), env=PLANE_ENV)
    replicas: list[ServerProcess] = []
    try:
        for _ in range(2):
            replicas.append(
                start_server(
                    repo,
                    "--state-dir",
                    str(state),
                    "--control-plane",
                    plane.url,
                    "--workers",
                    "2",
                    timeout=180,
                )
            )
        fleet = Fleet(repo, state, plane, replicas)
        yield fleet
        plane = fleet.plane  # a test may have restarted it
    finally:
        for replica in replicas:
            replica.stop()
        plane.stop()


def _drifted_rows() -> np.ndarray:
    digits = load_digits()
    rng = np.random.default_rng(7)
    rows = digits.data[rng.integers(0, len(digits.data), DRIFTED)].astype(np.float32)
    # Brighter, noisier images: the pixel distributions move, so do the predictions.
    return np.clip(rows * 1.6 + rng.normal(0, 2.0, rows.shape), 0, 16).astype(np.float32)


def _predict(url: str, client: httpx.Client, rid: str, row: np.ndarray, model: str = "digits") -> list[float]:
    r = client.post(
        f"{url}/v1/models/{model}:predict",
        json={"instances": [row.tolist()]},
        headers={"x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_the_control_plane_sees_every_replicas_traffic_once(fleet: Fleet) -> None:
    from modelloop.monitoring.drift import DriftDetector

    rows = _drifted_rows()
    outputs = []
    clients = [httpx.Client(timeout=60), httpx.Client(timeout=60)]
    try:
        for i, row in enumerate(rows):
            # Alternate replicas; each replica's kernel spreads connections over its workers.
            outputs.append(_predict(fleet.replicas[i % 2].rest_url, clients[i % 2], f"d{i}", row, UNION))
    finally:
        for client in clients:
            client.close()
    labels = {"model": UNION, "version": "1"}
    assert wait_for(
        lambda: fleet.plane.metric("modelloop_monitoring_window_rows", **labels) >= DRIFTED, timeout=90
    ), fleet.plane.output()[-3000:]
    assert fleet.plane.metric("modelloop_monitoring_window_rows", **labels) == DRIFTED
    # The same traffic judged in one place, with the baseline the version shipped.
    baseline = json.loads((fleet.repo / UNION / "1" / "baseline.json").read_text())
    expected = DriftDetector(baseline).evaluate(rows.astype(np.float64), np.argmax(outputs, axis=1))

    def share() -> float:
        return fleet.plane.metric("modelloop_drift_share", **labels)

    assert wait_for(lambda: abs(share() - expected.share) < 1e-9, timeout=30), (share(), expected.share)
    assert expected.share > 0.3
    assert expected.prediction_psi is not None
    psi = fleet.plane.metric("modelloop_prediction_drift", **labels)
    assert psi == pytest.approx(expected.prediction_psi, rel=1e-6)
    # The servers export no monitoring gauges: one exporter, no max over workers.
    served = httpx.get(f"{fleet.replicas[0].rest_url}/metrics", timeout=10).text
    assert "modelloop_drift_share" not in served


def test_labels_sent_to_one_replica_join_predictions_the_other_answered(fleet: Fleet) -> None:
    digits = load_digits()
    with httpx.Client(timeout=60) as client:
        for i in range(20):
            _predict(fleet.replicas[0].rest_url, client, f"join{i}", digits.data[i].astype(np.float32))
        items = [{"request_id": f"join{i}", "target": int(digits.target[i])} for i in range(20)]
        r = client.post(f"{fleet.replicas[1].rest_url}/v1/models/digits/feedback", json={"feedback": items})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["accepted"]) == sorted(f"join{i}" for i in range(20))


def test_kill_9_of_the_control_plane_loses_and_doubles_nothing(fleet: Fleet) -> None:
    digits = load_digits()
    answered: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic(replica: ServerProcess, prefix: str) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                rid = f"{prefix}{i}"
                try:
                    r = client.post(
                        f"{replica.rest_url}/v1/models/digits:predict",
                        json={"instances": [digits.data[i % 100].tolist()]},
                        headers={"x-request-id": rid},
                        timeout=30,
                    )
                except httpx.HTTPError as exc:
                    failures.append(f"{rid}: {exc}")
                else:
                    if r.status_code == 200:
                        answered.append(rid)
                    else:
                        failures.append(f"{rid}: {r.status_code} {r.text}")
                i += 1

    # A label acknowledged before the kill.
    with httpx.Client(timeout=60) as client:
        _predict(fleet.replicas[0].rest_url, client, "kept-label", digits.data[3].astype(np.float32))
        r = client.post(
            f"{fleet.replicas[0].rest_url}/v1/models/digits/feedback",
            json={"feedback": [{"request_id": "kept-label", "target": int(digits.target[3])}]},
        )
        assert r.status_code == 200, r.text
    threads = [
        threading.Thread(target=traffic, args=(fleet.replicas[n], f"k{n}-"), daemon=True) for n in range(2)
    ]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: len(answered) >= 100, timeout=60)
    port = int(fleet.plane.url.rsplit(":", 1)[1])
    fleet.plane.stop(signal.SIGKILL)
    # Serving goes on while the control plane is down.
    before = len(answered)
    assert wait_for(lambda: len(answered) >= before + 100, timeout=60)
    fleet.plane = start_monitor(fleet.repo, "--state-dir", str(fleet.state), env=PLANE_ENV, port=port)
    after = len(answered)
    assert wait_for(lambda: len(answered) >= after + 100, timeout=60)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []

    def stored() -> int:
        with sqlite3.connect(fleet.db, timeout=30) as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM predictions WHERE model = 'digits' AND request_id LIKE 'k_-%'"
            ).fetchone()
        return int(count)

    # Every answered request is stored, once (the table keeps one row per id).
    assert wait_for(lambda: stored() >= len(answered), timeout=90), (stored(), len(answered))
    assert stored() == len(set(answered)) == len(answered)
    with sqlite3.connect(fleet.db, timeout=30) as conn:
        (labels,) = conn.execute("SELECT COUNT(*) FROM feedback WHERE request_id = 'kept-label'").fetchone()
    assert labels == 1
