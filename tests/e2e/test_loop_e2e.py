"""The whole loop with the real parts: serve, Prometheus, Alertmanager, webhook, retrain, canary, v2.

A real ``modelloop serve`` (admin token, 1 s monitoring evaluations), Debian's Prometheus
(1 s scrape and rule evaluation, the project's rule file with ``ModelDriftDetected``'s
``for: 1m`` shortened to 5 s) and Alertmanager (``group_wait`` 1 s, webhook with the bearer
token) run on loopback. Normal labelled traffic fires no alert; inverted, noisy digits with
labels fire ``ModelDriftDetected`` once it held for 5 s,
Alertmanager calls ``POST /monitoring/alerts``, the server launches ``modelloop retrain``
and the blessed candidate is published as version 2, a canary beside version 1 that labelled
drifted traffic walks 10 -> 50 -> 100 % until it is promoted. The timeline and the accuracy before
and after are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modelloop.monitoring.simulate import simulate
from tests.e2e.serverproc import ServerProcess, start_server, wait_for
from tests.tools import Daemon, require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = REPO_ROOT / "monitoring" / "rules" / "modelloop.rules.yml"
TOKEN = "e2e-admin-token"

pytestmark = pytest.mark.slow


# How long the drift alert is pending here before it fires: the rule file's `for: 1m` (its
# promtool tests, monitoring/rules/tests/, check the minute) would be a minute of waiting.
DRIFT_FOR = "5s"


def shortened_rules(path: Path) -> Path:
    """The project's rule file with ``ModelDriftDetected``'s ``for`` set to :data:`DRIFT_FOR`;
    every expression, label and other rule as they are."""
    rules = yaml.safe_load(RULES.read_text())
    drift = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "ModelDriftDetected"]
    assert len(drift) == 1 and drift[0]["for"] == "1m", drift
    drift[0]["for"] = DRIFT_FOR
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def prometheus_config(path: Path, rest: str, am_port: int) -> None:
    path.write_text(
        json.dumps(  # JSON is YAML: no templating of YAML text needed
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(shortened_rules(path.with_name("rules.yml")))],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [
                    {"job_name": "modelloop", "static_configs": [{"targets": [rest.removeprefix("http://")]}]}
                ],
            }
        )
    )


def alertmanager_config(path: Path, rest: str) -> None:
    path.write_text(
        json.dumps(
            {
                "route": {
                    "receiver": "default",
                    "group_by": ["alertname", "model"],
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                    "routes": [{"receiver": "retrain", "matchers": ['action="retrain"']}],
                },
                "receivers": [
                    {"name": "default"},
                    {
                        "name": "retrain",
                        "webhook_configs": [
                            {
                                "url": f"{rest}/monitoring/alerts",
                                "send_resolved": False,
                                "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN}},
                            }
                        ],
                    },
                ],
            }
        )
    )


def prom_alerts(prom: str) -> list[dict[str, Any]]:
    try:
        return httpx.get(f"{prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def prom_value(prom: str, query: str) -> float | None:
    try:
        result = httpx.get(f"{prom}/api/v1/query", params={"query": query}, timeout=5).json()["data"][
            "result"
        ]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return float(result[0]["value"][1]) if result else None


def version_states(rest: str) -> dict[str, str]:
    try:
        body = httpx.get(f"{rest}/v1/models/digits", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {s["version"]: s["state"] for s in body.get("model_version_status", [])}


def metric_value(rest: str, line_prefix: str) -> float:
    for line in httpx.get(f"{rest}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_drift_alert_retrains_and_serves_v2(tmp_path: Path, digits_repo: Path):
    prometheus = require_tool("prometheus", "Debian package prometheus")
    alertmanager = require_tool("prometheus-alertmanager", "Debian package prometheus-alertmanager")
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    # The blessed retrain becomes a candidate and walks a canary to 100 % on live guardrails.
    rollout = {
        "mode": "canary",
        "steps": [10, 50, 100],
        "step_min_requests": 20,
        "min_labels": 10,
        "max_accuracy_drop": 0.2,
        # The default latency guardrail: a call counts as slow only when it is also 2 ms slower
        # than the champion's p99, judged against the champion's slow share in the same window.
        "max_latency_ratio": 3.0,
    }
    (repo / "digits" / "config.json").write_text(
        json.dumps(
            # A 5-epoch retrain is judged on accuracy here; the per-class margin has its own tests
            # (tests/test_retrain.py) and can reject a short retrain on one weak class.
            {"retrain": {"epochs": 5, "class_margin": 1.0}, "rollout": rollout}
        )
    )
    daemons: list[Daemon] = []
    server: ServerProcess | None = None
    env = {
        "MODELLOOP_ADMIN_TOKEN": TOKEN,
        "MODELLOOP_MONITORING_STATE_DIR": str(tmp_path / "state"),
        "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "1",
        "MODELLOOP_MONITORING_MIN_ROWS": "100",
        "MODELLOOP_MONITORING_WINDOW_SIZE": "300",
        "MODELLOOP_MONITORING_ROLLOUT_INTERVAL_S": "0.2",
    }
    try:
        # Every daemon binds port 0 and logs its port. Alertmanager comes first, since the
        # server is told where it is; it learns the server's webhook address by a reload.
        alertmanager_config(tmp_path / "alertmanager.yml", "http://127.0.0.1:9")
        am = Daemon.start(
            [
                alertmanager,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                "--web.listen-address=127.0.0.1:0",
                "--cluster.listen-address=",
            ],
            tmp_path / "alertmanager.log",
        )
        daemons.append(am)
        # Alertmanager is in charge: the in-process rules stay off.
        server = start_server(repo, env={**env, "MODELLOOP_MONITORING_ALERTMANAGER_URL": am.url})
        rest = server.rest_url
        alertmanager_config(tmp_path / "alertmanager.yml", rest)
        assert httpx.post(f"{am.url}/-/reload", timeout=30).status_code == 200, am.tail()
        prometheus_config(tmp_path / "prometheus.yml", rest, am.port)
        daemons.append(
            Daemon.start(
                [
                    prometheus,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    "--web.listen-address=127.0.0.1:0",
                ],
                tmp_path / "prometheus.log",
            )
        )
        prom = daemons[1].url
        assert wait_for(lambda: prom_value(prom, 'up{job="modelloop"}') == 1.0, timeout=30), daemons[1].tail()

        # Normal labelled traffic: drift evaluated, nothing fires.
        normal = simulate(rest, requests=100, batch=4, seed=1)["phases"]["normal"]
        assert wait_for(lambda: prom_value(prom, 'modelloop_drift_detected{model="digits"}') is not None, 20)
        # Prometheus has scraped the verdict a few times, so its rules (evaluated every second)
        # have seen it: an alert that was going to go pending would be there by now.
        scrapes = 'count_over_time(modelloop_drift_detected{model="digits"}[1m])'
        assert wait_for(lambda: (prom_value(prom, scrapes) or 0) >= 4, 30)
        normal_share = prom_value(prom, 'modelloop_drift_share{model="digits"}')
        assert prom_value(prom, 'modelloop_drift_detected{model="digits"}') == 0.0
        assert prom_alerts(prom) == [], prom_alerts(prom)

        # Drifted labelled traffic: the alert goes pending, then fires after `for: 5s`.
        t0 = time.monotonic()
        drifted = simulate(rest, drift=True, normal=False, requests=150, batch=4, seed=2)["phases"]["drifted"]
        assert wait_for(lambda: prom_value(prom, 'modelloop_drift_detected{model="digits"}') == 1.0, 20)
        drifted_share = prom_value(prom, 'modelloop_drift_share{model="digits"}')
        assert wait_for(
            lambda: any(
                a["labels"]["alertname"] == "ModelDriftDetected" and a["state"] == "firing"
                for a in prom_alerts(prom)
            ),
            timeout=120,
            interval=0.5,
        ), prom_alerts(prom)
        t_firing = time.monotonic()
        assert wait_for(lambda: "started a retrain of digits" in server.output(), 30), daemons[0].tail()
        t_webhook = time.monotonic()
        assert wait_for(lambda: version_states(rest).get("2") == "AVAILABLE", 120, interval=0.2), (
            server.output()[-5000:]
        )
        t_v2 = time.monotonic()
        blessed = 'modelloop_retrain_runs_total{model="digits",outcome="blessed"}'
        assert wait_for(lambda: metric_value(rest, blessed) == 1.0, 30), server.output()[-3000:]

        # Version 2 is a candidate beside version 1: labelled drifted traffic walks it to 100 %.
        def rollout_state() -> dict[str, Any]:
            r = httpx.get(f"{rest}/monitoring/rollouts/digits", timeout=5)
            return r.json() if r.status_code == 200 else {}

        assert wait_for(lambda: rollout_state().get("candidate") == 2, 20), server.output()[-3000:]
        assert version_states(rest).get("1") == "AVAILABLE"  # the champion stays until the walk ends
        seed = 10
        while rollout_state().get("state") != "promoted" and time.monotonic() - t_v2 < 120:
            simulate(rest, drift=True, normal=False, requests=100, batch=4, seed=seed)
            seed += 1
        state = rollout_state()
        assert state["state"] == "promoted" and state["champion"] == 2, (state.get("reason"), state)
        t_promoted = time.monotonic()
        steps = [e["share"] for e in state["history"] if e["event"] in ("started", "step")]
        assert steps == [10, 50, 100], state["history"]
        assert wait_for(lambda: version_states(rest).get("1") in (None, "END"), 30)

        records = sorted((tmp_path / "state" / "retrain" / "digits").glob("*.json"))
        record = json.loads(records[-1].read_text())
        assert record["outcome"] == "blessed" and record["version"] == 2
        after = simulate(rest, drift=True, normal=False, requests=25, batch=4, seed=3)["phases"]["drifted"]
        m = record["metrics"]
        print(
            "\n=== modelloop loop, end to end ===\n"
            f"drift share: normal traffic {normal_share}, drifted traffic {drifted_share}\n"
            f"served accuracy: normal {normal['accuracy']:.3f}, drifted on v1 {drifted['accuracy']:.3f}, "
            f"drifted on v2 {after['accuracy']:.3f}\n"
            f"gate (fixed eval set, {m['serving']['eval']['rows']} rows): serving v1 "
            f"{m['serving']['eval']['accuracy']:.3f} -> candidate {m['candidate']['eval']['accuracy']:.3f}; "
            f"test split {m['serving']['test_split']['accuracy']:.3f} -> "
            f"{m['candidate']['test_split']['accuracy']:.3f}; "
            f"held-out drifted feedback {m['serving']['feedback_holdout']['accuracy']:.3f} -> "
            f"{m['candidate']['feedback_holdout']['accuracy']:.3f}\n"
            f"timeline from the first drifted request: alert firing +{t_firing - t0:.1f} s, "
            f"webhook +{t_webhook - t0:.1f} s, v2 AVAILABLE (candidate) +{t_v2 - t0:.1f} s, "
            f"canary {steps} % -> promoted +{t_promoted - t0:.1f} s "
            f"(retrain {record['seconds']:.1f} s, feedback rows {record['feedback_rows']})\n"
        )
        assert after["accuracy"] > drifted["accuracy"] + 0.2
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        if server is not None:
            server.stop()
