"""The Grafana dashboard: every PromQL expression parses in a real Prometheus, names only
metrics we export, and returns data from what a real server exports after real traffic.

A real ``modelloop serve`` (monitoring on, evaluations every second, a canary rollout
policy, batching) serves a copy of the digits repository, and a thread sends it labelled
digits traffic for as long as the module runs. Before the queries the server goes through
what fills the dashboard's other panels: a model whose version fails to load, an alert
that starts a real retrain (refused by its gate), a new version that starts a canary.
Debian's Prometheus scrapes it every second. Each expression goes to ``/api/v1/query``
with the dashboard variables substituted: a parse error is a 400, and an empty result
means the expression's labels or aggregation do not fit what the server exports.

Last, ``scripts/render_dashboard.py`` draws every panel from the same Prometheus over the
scraped span and headless Chromium takes its picture (``tests/artifacts/`` or
``$MODELLOOP_ARTIFACTS``); with ``MODELLOOP_DOCS_IMAGES=DIR`` (``make screenshots``) it
waits for three minutes of scrapes and writes ``DIR/grafana-dashboard.png``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelloop.monitoring.simulate import simulate
from scripts import render_dashboard
from tests.e2e.browser import open_browser
from tests.e2e.serverproc import start_server
from tests.tools import Daemon, require_chromium, require_tool, wait_for

# Tens of seconds or more: `make test-fast` leaves it out.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "monitoring" / "dashboards" / "modelloop.json"
ARTIFACTS = Path(os.environ.get("MODELLOOP_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))
DOCS_IMAGES = os.environ.get("MODELLOOP_DOCS_IMAGES")
# Seconds of scrapes the drawn dashboard spans: enough for curves in the docs' picture.
DRAWN_SECONDS = 180 if DOCS_IMAGES else 20

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
# Grafana fills these in; any valid value will do for a parse and data check. The model
# variable is multi-valued: both models of the test's repository are selected.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${model}": "(digits|broken)",
    "$model": "(digits|broken)",
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


TOKEN = "dashboard-admin-token"
TESTDATA = Path(__file__).resolve().parents[1] / "testdata"


def _metric_names(rest: str) -> set[str]:
    """The names of the series the server exports now (a histogram's ``_bucket`` among them)."""
    text = httpx.get(f"{rest}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("modelloop_")]
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in lines}


def _dashboard_metrics() -> set[str]:
    return {name for e in _expressions() for name in _METRIC.findall(e.expr)}


class _Traffic(threading.Thread):
    """Labelled digits traffic (``simulate``) until stopped."""

    def __init__(self, rest: str) -> None:
        super().__init__(daemon=True)
        self.rest = rest
        self.halt = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        seed = 0
        while not self.halt.is_set():
            try:
                simulate(self.rest, requests=20, batch=4, seed=seed, out=io.StringIO())
            except Exception as exc:  # noqa: BLE001 - reported by the fixture, not lost in a thread
                self.errors.append(repr(exc))
                self.halt.wait(0.5)
            seed += 1


def _publish(repo: Path, name: str, version: int, *, broken: bool = False) -> None:
    """Builds a copy of digits version 1 beside the repository and renames it in, as an export does."""
    staging = repo / ".staging" / f"{name}-{version}"
    shutil.copytree(repo / "digits" / "1", staging)
    if broken:
        (staging / "model.onnx").write_bytes(b"not an onnx model")
        shutil.rmtree(staging / "saved_model", ignore_errors=True)
    (repo / name).mkdir(exist_ok=True)
    staging.rename(repo / name / str(version))


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> Iterator[str]:
    """A real Prometheus that has scraped a real server's metrics, every panel's included."""
    binary = require_tool("prometheus", "Debian package prometheus")
    root = tmp_path_factory.mktemp("dashboard")
    repo = root / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    rollout = {"mode": "canary", "steps": [10, 100], "step_min_requests": 1_000_000, "min_labels": 1_000_000}
    # A one-epoch retrain its gate refuses: counted, and nothing published.
    retrain = {"epochs": 1, "accuracy_floor": 0.999}
    (repo / "digits" / "config.json").write_text(json.dumps({"rollout": rollout, "retrain": retrain}))
    env = {
        "MODELLOOP_ADMIN_TOKEN": TOKEN,
        "MODELLOOP_MONITORING_STATE_DIR": str(root / "state"),
        "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "1",
        "MODELLOOP_MONITORING_MIN_ROWS": "50",
        "MODELLOOP_MONITORING_WINDOW_SIZE": "200",
        "MODELLOOP_MONITORING_ROLLOUT_INTERVAL_S": "0.2",
    }
    server = start_server(repo, env=env)
    traffic = _Traffic(server.rest_url)
    daemon: Daemon | None = None
    try:
        rest = server.rest_url
        traffic.start()
        # A second model whose only version fails to load: modelloop_model_load_failures_total.
        _publish(repo, "broken", 1, broken=True)
        # An alert starts a real retrain (modelloop_retrain_runs_total once it ends), once the
        # traffic's labels are in: a drift alert without new trusted labels retrains nothing.
        assert wait_for(lambda: "modelloop_feedback_total" in _metric_names(rest), timeout=120), (
            traffic.errors
        )
        alert = json.loads((TESTDATA / "alertmanager-firing.json").read_text())
        r = httpx.post(
            f"{rest}/monitoring/alerts", json=alert, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        assert r.status_code == 200 and "started" in r.text, r.text
        assert wait_for(lambda: "modelloop_retrain_runs_total" in _metric_names(rest), timeout=600), (
            server.output()[-3000:]
        )
        # A new version: a canary beside version 1 (its steps wait for more requests than come).
        _publish(repo, "digits", 2)
        wanted = _dashboard_metrics()
        assert wait_for(lambda: wanted <= _metric_names(rest), timeout=120), (
            sorted(wanted - _metric_names(rest)),
            traffic.errors[-3:],
            server.output()[-3000:],
        )
        config = root / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: modelloop\n"
            f"    static_configs: [{{targets: ['{rest.removeprefix('http://')}']}}]\n"
        )
        daemon = Daemon.start(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                "--web.listen-address=127.0.0.1:0",
            ],
            root / "prometheus.log",
        )
        url = daemon.url
        scrapes = 'count_over_time(up{job="modelloop"}[1m])'

        def scraped() -> bool:
            try:
                status, body = _query(url, scrapes)
            except (urllib.error.URLError, ConnectionError, ValueError):  # not ready: 503, no JSON
                return False
            result = body["data"]["result"] if status == 200 else []
            return bool(result) and float(result[0]["value"][1]) >= 4

        assert wait_for(scraped, timeout=60), daemon.tail()
        yield url
    finally:
        traffic.halt.set()
        traffic.join(timeout=60)
        if daemon is not None:
            daemon.stop()
        server.stop()


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


def test_the_dashboard_drawn_from_real_data(prometheus_url: str) -> None:
    """Every panel drawn from the dashboard's own queries over the scraped span, and its picture."""
    require_chromium()
    scrapes = 'count_over_time(up{job="modelloop"}[1h])'

    def scraped_for() -> float:
        status, body = _query(prometheus_url, scrapes)
        result = body["data"]["result"] if status == 200 else []
        return float(result[0]["value"][1]) if result else 0.0

    assert wait_for(lambda: scraped_for() >= DRAWN_SECONDS, timeout=DRAWN_SECONDS + 60)
    end = time.time()
    dashboard = _dashboard()
    panels = render_dashboard.query_panels(dashboard, prometheus_url, start=end - scraped_for(), end=end)
    drawn = [p for p in panels if p.spec["type"] != "row"]
    assert len(drawn) == len([p for p in _panels(dashboard) if p["type"] != "row"])
    for panel in drawn:
        assert panel.errors == [], panel.errors
        assert any(s.points for s in panel.series), f"{panel.spec['title']}: nothing to draw"
    page = render_dashboard.render_page(
        dashboard,
        panels,
        t0=end - scraped_for(),
        t1=end,
        models=", ".join(render_dashboard.model_values(prometheus_url)),
    )
    assert "No data" not in page and "<script" not in page
    html_file = ARTIFACTS / "grafana-dashboard.html"
    html_file.parent.mkdir(parents=True, exist_ok=True)
    html_file.write_text(page)
    browser = open_browser(width=render_dashboard.PAGE_WIDTH, height=900)
    try:
        browser.call("Page.navigate", url=html_file.resolve().as_uri())
        assert browser.wait_for("document.readyState === 'complete'", 30)
        assert browser.evaluate("document.querySelectorAll('.panel svg').length") == len(drawn)
        assert browser.evaluate("[document.documentElement.scrollWidth, innerWidth]")[0] <= (
            render_dashboard.PAGE_WIDTH
        )
        shot = browser.screenshot(ARTIFACTS / "grafana-dashboard.png")
        assert browser.console_errors == [], browser.console_errors
        assert all(r.startswith(("file:", "data:", "about:")) for r in browser.requests), browser.requests
    finally:
        browser.close()
    assert shot.stat().st_size > 20_000
    if DOCS_IMAGES:
        Path(DOCS_IMAGES).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(DOCS_IMAGES) / "grafana-dashboard.png")
