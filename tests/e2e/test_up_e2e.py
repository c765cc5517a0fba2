"""``modelloop up`` on an empty repository: trains, exports, serves, prints a working curl line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.tools import require_tool


@pytest.mark.slow
def test_up_trains_exports_serves_and_prints_a_working_curl_line(tmp_path: Path):
    require_tool("curl", "Debian package curl")
    repo = tmp_path / "models"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelloop",
            "up",
            "--repo",
            str(repo),
            "--rest-port",
            "0",
            "--grpc-port",
            "0",
            "--epochs",
            "5",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("Ctrl-C drains and stops" in line for line in lines):
            assert proc.poll() is None, "\n".join(lines)
            time.sleep(0.2)
        text = "\n".join(lines)
        assert "Ctrl-C drains and stops" in text, text
        for name in ("model.onnx", "saved_model", "model.json", "baseline.json"):
            assert (repo / "digits" / "1" / name).exists(), name
        assert f"published {repo / 'digits' / '1'}" in text
        # New versions of the demo's digits roll out as a canary.
        assert json.loads((repo / "digits" / "config.json").read_text())["rollout"]["mode"] == "canary"
        for label in ("TF Serving REST", "OIP V2 REST", "gRPC", "API docs", "metrics"):
            assert label in text
        curl = re.search(r"(curl -s -X POST .*?)\n\s+(-d '.*')", text)
        assert curl, text
        command = curl.group(1).rstrip("\\").strip() + " " + curl.group(2)
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True)
        predictions = json.loads(out.stdout)["predictions"]
        assert len(predictions) == 1 and len(predictions[0]) == 10
        assert max(range(10), key=lambda i: predictions[0][i]) == 0  # the sample is a zero
        # Feedback is authenticated: up made a labeler token and says where it is.
        token_file = tmp_path / "state" / "feedback.token"
        assert f"Authorization: Bearer $(cat {token_file})" in text
        feedback = re.search(r"feedback\s+(http://\S+/feedback)", text)
        assert feedback, text
        label = {"feedback": [{"request_id": "none", "target": 0}]}
        assert httpx.post(feedback.group(1), json=label, timeout=10).status_code == 401
        token = token_file.read_text().strip()
        answer = httpx.post(
            feedback.group(1), json=label, headers={"authorization": f"Bearer {token}"}, timeout=10
        )
        assert answer.status_code == 404 and answer.json()["source"] == "default"  # authenticated, id unknown
        # The control plane up started reads the server's log: the prediction above is in its window.
        plane = re.search(r"control plane\s+(http://\S+)", text)
        assert plane, text

        def window_rows() -> float:
            metrics = httpx.get(f"{plane.group(1)}/metrics", timeout=10).text
            rows = [
                line for line in metrics.splitlines() if line.startswith("modelloop_monitoring_window_rows{")
            ]
            return float(rows[0].rsplit(" ", 1)[1]) if rows else 0.0

        deadline = time.monotonic() + 60
        while window_rows() < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert window_rows() >= 1
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            code = proc.wait(timeout=10)
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0, "\n".join(lines)


def test_up_on_a_repo_with_models_trains_nothing(digits_repo: Path, tmp_path: Path):
    from modelloop.up import ensure_default_model, repo_has_models

    assert repo_has_models(digits_repo)
    assert ensure_default_model(digits_repo) is None
    assert not repo_has_models(tmp_path)
    (tmp_path / "m" / "junk").mkdir(parents=True)
    assert not repo_has_models(tmp_path)
