"""The example Alertmanager configuration: it parses, and a real Alertmanager sends only the
retrain alerts to the server's webhook, with the bearer token from the credentials file."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import Daemon, require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "monitoring" / "alertmanager" / "alertmanager.yml"
TOKEN = "test-admin-token"


def test_amtool_check_config() -> None:
    result = subprocess.run(
        [require_tool("amtool", "Debian package prometheus-alertmanager"), "check-config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_webhook_reads_its_token_from_a_file() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == "modelloop-retrain"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"].endswith("/monitoring/alerts")
    assert webhook["http_config"]["authorization"]["type"] == "Bearer"
    assert "credentials" not in webhook["http_config"]["authorization"], "no inline secrets"
    assert webhook["http_config"]["authorization"]["credentials_file"]


@pytest.fixture
def webhook() -> Iterator[tuple[str, queue.Queue[tuple[dict[str, str], dict[str, Any]]]]]:
    """A stand-in for the server's POST /monitoring/alerts that records each call."""
    calls: queue.Queue[tuple[dict[str, str], dict[str, Any]]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.put((dict(self.headers), {"path": self.path, **json.loads(body)}))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/monitoring/alerts", calls
    finally:
        server.shutdown()
        server.server_close()


def _post_alerts(url: str, alerts: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(
        f"{url}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_only_retrain_alerts_reach_the_webhook_with_the_bearer_token(
    tmp_path: Path, webhook: tuple[str, queue.Queue[tuple[dict[str, str], dict[str, Any]]]]
) -> None:
    binary = require_tool("prometheus-alertmanager", "Debian package prometheus-alertmanager")
    url, calls = webhook
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # a trailing newline, as `echo` writes it
    config = yaml.safe_load(CONFIG.read_text())
    # Same routing and receivers; only the address, the token path and the waits change.
    config["route"]["group_wait"] = "200ms"
    receiver = next(r for r in config["receivers"] if r["name"] == "modelloop-retrain")
    receiver["webhook_configs"][0]["url"] = url
    receiver["webhook_configs"][0]["http_config"]["authorization"]["credentials_file"] = str(token_file)
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))

    daemon = Daemon.start(
        [
            binary,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            "--web.listen-address=127.0.0.1:0",
            "--cluster.listen-address=",  # no gossip port: a single instance
        ],
        tmp_path / "alertmanager.log",
    )
    am_url, proc = daemon.url, daemon.proc
    try:
        _wait_ready(am_url, proc, tmp_path / "alertmanager.log")
        now = datetime.now(UTC).isoformat()
        _post_alerts(
            am_url,
            [
                {
                    "labels": {
                        "alertname": "ModelHighLatencyP99",
                        "model": "digits",
                        "severity": "warning",
                    },
                    "startsAt": now,
                },
                {
                    "labels": {
                        "alertname": "ModelDriftDetected",
                        "model": "digits",
                        "version": "1",
                        "severity": "warning",
                        "action": "retrain",
                    },
                    "annotations": {"summary": "Input drift on digits v1"},
                    "startsAt": now,
                },
            ],
        )
        headers, payload = calls.get(timeout=15)
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert payload["path"] == "/monitoring/alerts"
        assert payload["version"] == "4"
        assert payload["status"] == "firing"
        assert payload["receiver"] == "modelloop-retrain"
        assert [a["labels"]["alertname"] for a in payload["alerts"]] == ["ModelDriftDetected"]
        assert payload["alerts"][0]["labels"]["model"] == "digits"
        assert payload["groupKey"] and payload["alerts"][0]["startsAt"]
        # The latency alert was routed to the empty default receiver, never to the webhook:
        # Alertmanager's own API says where each alert went.
        assert _receivers(am_url) == {
            "ModelHighLatencyP99": ["default"],
            "ModelDriftDetected": ["modelloop-retrain"],
        }
        assert calls.empty()
    finally:
        daemon.stop()


def _receivers(url: str) -> dict[str, list[str]]:
    """The receivers Alertmanager routed each active alert to, by alert name."""
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as response:
        alerts = json.loads(response.read())
    return {a["labels"]["alertname"]: sorted(r["name"] for r in a["receivers"]) for a in alerts}


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"alertmanager exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    pytest.fail(f"alertmanager was not ready within 20 s:\n{log.read_text()[-2000:]}")
