"""The loop with the control plane apart: a server that only answers and logs, ``modelloop
monitor`` beside it. Drifted labelled traffic goes to the server; the control plane sees the
drift in the server's log, an alert (Alertmanager's webhook, sent to the server's address
and forwarded) starts a retrain there, the new version is published, and the server picks it
up and walks it through a canary to 100 %.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelloop.monitoring.simulate import simulate
from tests.e2e.serverproc import MonitorProcess, ServerProcess, start_monitor, start_server, wait_for

pytestmark = pytest.mark.slow

TOKEN = "split-loop-admin-token"
TESTDATA = Path(__file__).resolve().parents[1] / "testdata"


def _states(rest: str) -> dict[str, str]:
    try:
        body = httpx.get(f"{rest}/v1/models/digits", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {s["version"]: s["state"] for s in body.get("model_version_status", [])}


def _rollout(rest: str) -> dict[str, Any]:
    r = httpx.get(f"{rest}/monitoring/rollouts/digits", timeout=5)
    return r.json() if r.status_code == 200 else {}


def test_a_drift_alert_retrains_in_the_control_plane_and_the_server_rolls_the_new_version_out(
    tmp_path: Path, digits_repo: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    rollout = {"mode": "canary", "steps": [10, 50, 100], "step_min_requests": 20, "min_labels": 10}
    rollout |= {"max_accuracy_drop": 0.2, "max_latency_ratio": 3.0}
    # Retrain quickly: a 5-epoch candidate may lose a few points of one class's recall on the
    # drifted digits, which the per-class gate (tested in tests/test_retrain.py) would refuse.
    retrain = {"epochs": 5, "class_margin": 1.0}
    # The label checks (tests/monitoring/test_quarantine.py) may read this one unauthenticated
    # source's labels on drifted digits, which the champion confidently gets wrong, as a
    # targeted flip; here the canary is judged on them.
    feedback = {"enabled": False}
    (repo / "digits" / "config.json").write_text(
        json.dumps({"retrain": retrain, "rollout": rollout, "feedback": feedback})
    )
    env = {
        "MODELLOOP_ADMIN_TOKEN": TOKEN,
        "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "1",
        "MODELLOOP_MONITORING_MIN_ROWS": "100",
        "MODELLOOP_MONITORING_WINDOW_SIZE": "300",
        "MODELLOOP_MONITORING_ROLLOUT_INTERVAL_S": "0.2",
        # Alertmanager is in charge (its webhook is called below): no in-process rules.
        "MODELLOOP_MONITORING_ALERTMANAGER_URL": "http://127.0.0.1:9",
    }
    state = str(tmp_path / "state")
    plane: MonitorProcess | None = None
    server: ServerProcess | None = None
    try:
        plane = start_monitor(repo, "--state-dir", state, env=env)
        server = start_server(repo, "--state-dir", state, "--control-plane", plane.url, env=env)
        rest = server.rest_url
        drifted = simulate(rest, drift=True, normal=False, requests=150, batch=4, seed=2)["phases"]["drifted"]
        labels = {"model": "digits", "version": "1"}
        # The control plane, not the server, sees the drift.
        assert wait_for(lambda: plane.metric("modelloop_drift_detected", **labels) == 1.0, 30), plane.output()
        assert "modelloop_drift_detected" not in httpx.get(f"{rest}/metrics", timeout=5).text
        payload = json.loads((TESTDATA / "alertmanager-firing.json").read_text())
        answer = httpx.post(
            f"{rest}/monitoring/alerts",
            json=payload,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.json()["alerts"][0]["result"] == "started", answer.text
        assert wait_for(lambda: "started a retrain of digits" in plane.output(), 30), plane.output()[-3000:]
        assert wait_for(lambda: _states(rest).get("2") == "AVAILABLE", 180, interval=0.2), (
            plane.output()[-3000:] + server.output()[-3000:]
        )
        runs = {"model": "digits", "outcome": "blessed"}
        assert wait_for(lambda: plane.metric("modelloop_retrain_runs_total", **runs) == 1.0, 30)
        assert wait_for(lambda: _rollout(rest).get("candidate") == 2, 20), server.output()[-3000:]
        seed = 10
        while _rollout(rest).get("state") != "promoted" and seed < 40:
            simulate(rest, drift=True, normal=False, requests=100, batch=4, seed=seed)
            seed += 1
        state_now = _rollout(rest)
        assert state_now["state"] == "promoted" and state_now["champion"] == 2, (
            state_now.get("reason"),
            state_now,
            plane.output()[-4000:],
        )
        # The control plane judged: it started the rollout and promoted the candidate; the
        # server only counted its calls and followed the decisions.
        promoted = {"model": "digits", "event": "promoted"}
        assert plane.metric("modelloop_rollout_events_total", **promoted) == 1.0, plane.output()[-3000:]
        assert 'modelloop_rollout_events_total{event="promoted"' not in httpx.get(f"{rest}/metrics").text
        assert "rollout of version 2 against 1 started" in plane.output()
        assert "rollout of version 2 against 1 started" not in server.output()
        after = simulate(rest, drift=True, normal=False, requests=25, batch=4, seed=3)["phases"]["drifted"]
        print(
            f"\nsplit loop: drifted accuracy on v1 {drifted['accuracy']:.3f}, on v2 {after['accuracy']:.3f}"
        )
        assert after["accuracy"] > drifted["accuracy"] + 0.2
    finally:
        if server is not None:
            server.stop()
        if plane is not None:
            plane.stop()
