"""The Grafana dashboard: every PromQL expression parses in a real Prometheus, names only
metrics we export, and returns data once Prometheus scrapes a server-shaped exposition.

A real ``prometheus`` (Debian package) runs on loopback and scrapes a tiny exporter that
serves the serving metrics (the project's own ``ServingMetrics``) and the monitoring
metrics with the label sets of DESIGN.md. Each expression goes to ``/api/v1/query`` with
the dashboard variables substituted: a parse error is a 400, and an empty result means
the expression's labels or aggregation do not fit what the server exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from modelloop.monitoring.rollout import RolloutMetrics
from modelloop.serving.metrics import ServingMetrics
from tests.monitoring.monhelpers import free_port, stop_process
from tests.tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "monitoring" / "dashboards" / "modelloop.json"

# DESIGN.md "Metric names (contract)", with the series a histogram expands to.
_HISTOGRAMS = (
    "modelloop_request_duration_seconds",
    "modelloop_batch_size",
    "modelloop_queue_duration_seconds",
)
EXPORTED = {
    "modelloop_requests_total",
    *(f"{h}{suffix}" for h in _HISTOGRAMS for suffix in ("", "_bucket", "_sum", "_count")),
    "modelloop_model_versions_loaded",
    "modelloop_model_load_failures_total",
    "modelloop_feature_drift",
    "modelloop_drift_detected",
    "modelloop_prediction_drift",
    "modelloop_accuracy",
    "modelloop_feedback_total",
    "modelloop_retrain_runs_total",
    # Beyond DESIGN.md's list: the label-free estimate and input data quality.
    "modelloop_estimated_accuracy",
    "modelloop_estimated_accuracy_lower",
    "modelloop_estimated_accuracy_upper",
    "modelloop_feature_missing_share",
    "modelloop_feature_out_of_range_share",
    "modelloop_features_became_constant",
    # Rollouts.
    "modelloop_rollout_share",
    "modelloop_rollout_state",
    "modelloop_rollout_events_total",
}
REQUIRED_PANELS = {
    "Request rate by code",
    "Latency p50 / p95 / p99",
    "Batch size",
    "Queue time",
    "Versions loaded",
    "Top drifted features",
    "Drift detected",
    "Accuracy",
    "Feedback rate",
    "Retrain runs",
    "Estimated vs labelled accuracy",
    "Missing values (worst features)",
    "Out of training range (worst features)",
    "Features that became constant",
    "Rollout share",
    "Rollout events",
}
# Grafana fills these in; any valid value will do for a parse and data check.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${model}": "digits",
    "$model": "digits",
}
_METRIC = re.compile(r"\bmodelloop_[a-zA-Z0-9_]+")


@dataclass(frozen=True)
class Expression:
    """One PromQL expression of the dashboard and where it sits."""

    where: str
    expr: str


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def _expressions() -> list[Expression]:
    found = []
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            found.append(Expression(f"{panel['title']} / {target['refId']}", target["expr"]))
    return found


def _substitute(expr: str) -> str:
    for name, value in SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown dashboard variable left in {expr!r}"
    return expr


class _Exposition:
    """A registry shaped like a running server's, moving on at every scrape.

    The counters and histograms grow between scrapes, so ``rate()`` and
    ``histogram_quantile()`` have something to compute.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.serving = ServingMetrics(self.registry)
        self.serving.set_versions_loaded("digits", 1)
        self.serving.count_load_failure("digits")
        # The monitoring metrics of DESIGN.md, with their contract label sets.
        labels = ["model", "version"]
        self.feature_drift = Gauge(
            "modelloop_feature_drift", "", [*labels, "feature", "method"], registry=self.registry
        )
        self.drift_detected = Gauge("modelloop_drift_detected", "", labels, registry=self.registry)
        self.prediction_drift = Gauge("modelloop_prediction_drift", "", labels, registry=self.registry)
        self.accuracy = Gauge("modelloop_accuracy", "", labels, registry=self.registry)
        self.feedback = Counter(
            "modelloop_feedback", "", [*labels, "source", "outcome"], registry=self.registry
        )
        self.retrain = Counter("modelloop_retrain_runs", "", ["model", "outcome"], registry=self.registry)
        for i in range(12):
            self.feature_drift.labels("digits", "1", f"pixel_0_{i}", "psi").set(0.01 * i)
        for name in ("estimated_accuracy", "estimated_accuracy_lower", "estimated_accuracy_upper"):
            Gauge(f"modelloop_{name}", "", labels, registry=self.registry).labels("digits", "1").set(0.95)
        for name in ("feature_missing_share", "feature_out_of_range_share"):
            gauge = Gauge(f"modelloop_{name}", "", [*labels, "feature"], registry=self.registry)
            for i in range(8):
                gauge.labels("digits", "1", f"pixel_0_{i}").set(0.01 * i)
        Gauge("modelloop_features_became_constant", "", labels, registry=self.registry).labels(
            "digits", "1"
        ).set(0)
        self.drift_detected.labels("digits", "1").set(0)
        self.prediction_drift.labels("digits", "1").set(0.02)
        self.accuracy.labels("digits", "1").set(0.97)
        rollout = RolloutMetrics(self.registry)
        rollout.show(
            "digits", {"champion": 1, "candidate": 2, "state": "canary", "steps": [10, 100], "step": 0}
        )
        self.rollout_events = rollout.events
        self.lock = threading.Lock()

    def step(self) -> bytes:
        with self.lock:
            for code in ("OK", "OK", "OK", "INVALID_ARGUMENT"):
                self.serving.observe_request("digits", 1, "v2_rest", code, 0.003)
            self.serving.observe_batch("digits", 1, 4)
            self.serving.observe_queue("digits", 1, 0.0004)
            self.feedback.labels("digits", "1", "team-a", "accepted").inc(2)
            self.retrain.labels("digits", "blessed").inc()
            self.rollout_events.labels("digits", "step").inc()
            return generate_latest(self.registry)


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on loopback that has scraped the exposition a few times."""
    binary = require_tool("prometheus", "Debian package prometheus")
    exposition = _Exposition()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exposition.step()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    exporter = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: modelloop\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter.server_address[1]}']}}]\n"
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_scrapes(url, proc, tmp / "prometheus.log")
        yield url
    finally:
        stop_process(proc)
        log.close()
        exporter.shutdown()
        exporter.server_close()


def _wait_for_scrapes(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            status, body = _query(url, 'count_over_time(up{job="modelloop"}[1m])')
            result = body["data"]["result"] if status == 200 else []
            if result and float(result[0]["value"][1]) >= 4:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.25)
    pytest.fail(f"prometheus did not scrape the exporter within 30 s:\n{log.read_text()[-2000:]}")


def _query(url: str, expr: str) -> tuple[int, dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_a_broken_expression_is_a_400(prometheus_url: str) -> None:
    # Proves the check below can fail: Prometheus answers a parse error with 400.
    status, body = _query(prometheus_url, "sum by (model (rate(modelloop_requests_total[1m]))")
    assert status == 400
    assert body["errorType"] == "bad_data"


@pytest.mark.parametrize("expression", _expressions(), ids=lambda e: e.where)
def test_expression_parses_and_returns_data(prometheus_url: str, expression: Expression) -> None:
    status, body = _query(prometheus_url, _substitute(expression.expr))
    assert status == 200, f"{expression.where}: {body.get('error')}"
    assert body["status"] == "success"
    assert body["data"]["result"], f"{expression.where}: no data for {expression.expr!r}"


def test_expressions_name_only_exported_metrics() -> None:
    dashboard = _dashboard()
    texts = [e.expr for e in _expressions()]
    texts += [json.dumps(v.get("query", "")) for v in dashboard["templating"]["list"]]
    for text in texts:
        for name in _METRIC.findall(text):
            assert name in EXPORTED, f"{name} is not a metric modelloop exports (DESIGN.md)"
    for expression in _expressions():
        assert _METRIC.search(expression.expr), expression.where


def test_datasource_is_a_variable_and_every_query_filters_on_model() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    # Grafana's file provisioning cannot resolve __inputs/${DS_...}; a datasource variable can.
    assert "__inputs" not in dashboard
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    assert "label_values(" in variables["model"]["definition"]
    assert dashboard["id"] is None and dashboard["uid"]
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert 'model=~"$model"' in target["expr"], panel["title"]


def test_dashboard_has_the_panels_people_look_at() -> None:
    titles = {p["title"] for p in _panels(_dashboard())}
    assert titles >= REQUIRED_PANELS, f"missing {REQUIRED_PANELS - titles}"
    ids = [p["id"] for p in _panels(_dashboard()) if "id" in p]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert "topk(" in next(e.expr for e in _expressions() if e.where.startswith("Top drifted features"))
