"""``make up``, then ``modelloop simulate --drift``, watched on the live health page in Chromium.

As a person runs it: ``make up`` trains and serves digits (5 epochs, free ports, 1 s
evaluations) with a labeler token of its own, ``modelloop simulate --drift`` sends labelled
normal and then inverted digits with that token. Headless Chromium, with every host but
127.0.0.1 unresolvable, keeps the status page open throughout: the page loads without
console errors, asks nothing of any other origin, redraws itself without a reload, and
shows the accuracy drop, the drift rise and the label-free estimate that cannot see it.
(The retrain that follows is covered by ``tests/e2e/test_loop_e2e.py``.) The screenshot is
kept in ``tests/artifacts/`` (or ``$MODELLOOP_ARTIFACTS``); the docs' copy is
``docs/images/health-page.png``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from modelloop.monitoring.settings import FEEDBACK_TOKEN_FILE
from tests.e2e.browser import CHROMIUM, open_browser

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MODELLOOP_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))

pytestmark = pytest.mark.slow


def _require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("chromium is not installed (Debian package chromium)")
        pytest.skip("chromium is not installed (Debian package chromium)")


def _wait(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _history(url: str) -> dict[int, list[dict]]:
    r = httpx.get(f"{url}/monitoring/models/digits/history", params={"since": 0, "limit": 5000}, timeout=10)
    r.raise_for_status()
    return {s["version"]: s["points"] for s in r.json()["series"]}


def test_make_up_simulate_drift_and_the_live_health_page(tmp_path: Path) -> None:
    _require_chromium()
    repo, state = tmp_path / "models", tmp_path / "state"
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONUNBUFFERED": "1",
        "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "1",
        "MODELLOOP_MONITORING_MIN_ROWS": "100",
    }
    up_args = f"--repo {repo} --state-dir {state} --rest-port 0 --grpc-port 0 --epochs 5"
    # A session of its own: make and the server it starts are stopped together, by make's PID.
    up = subprocess.Popen(
        ["make", "up", f"UP_ARGS={up_args}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        for line in up.stdout or ():
            lines.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    browser = None
    try:
        _wait(lambda: any("Ctrl-C" in line for line in lines) or up.poll() is not None, 300, "make up")
        text = "\n".join(lines)
        found = re.search(r"REST listening on (http://127\.0\.0\.1:\d+)", text)
        assert found and up.poll() is None, text[-3000:]
        url = found.group(1)
        # Retrain quickly: the gate and the publish are the real ones.
        (repo / "digits" / "config.json").write_text(json.dumps({"retrain": {"epochs": 5}}))

        browser = open_browser(width=1400, height=1200)
        browser.call("Page.navigate", url=f"{url}/?minutes=15")
        assert browser.wait_for(
            "document.readyState === 'complete' && document.querySelector('#models') !== null", 30
        )
        browser.evaluate("window.__sameDocument = 'yes'")  # survives only if the page never reloads

        # `make up` configured a labeler token in its state directory, as its welcome says.
        token = ["--token-file", str(state / FEEDBACK_TOKEN_FILE)]
        simulate = subprocess.run(
            [sys.executable, "-m", "modelloop", "simulate", "--url", url, "--drift", "--rate", "40", *token],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert simulate.returncode == 0, simulate.stdout + simulate.stderr
        assert "drifted: served accuracy" in simulate.stdout
        # While v1 drifts, the page draws its top drifted features beside their baselines.
        assert browser.wait_for("document.querySelectorAll('#health svg.hist').length >= 1", 60)

        # The labelled inverted digits reach version 1's accuracy at the next evaluations.
        _wait(
            lambda: any(p["accuracy"] is not None and p["accuracy"] < 0.7 for p in _history(url).get(1, [])),
            120,
            "version 1's accuracy on the labelled inverted digits",
            interval=2,
        )
        history = _history(url)
        v1 = history[1]
        accuracy = [p["accuracy"] for p in v1 if p["accuracy"] is not None]
        drift = [p["drift_share"] for p in v1 if p["drift_share"] is not None]
        estimated = [p["estimated_accuracy"] for p in v1 if p["estimated_accuracy"] is not None]
        assert max(accuracy) > 0.9 and accuracy[-1] < 0.7, accuracy  # the accuracy drop
        assert min(drift) < 0.3 and max(drift) > 0.5, drift  # the drift rise
        assert min(estimated) > 0.9  # the estimate cannot see inverted digits (a new concept)
        assert any(p["request_rate"] for p in v1) and any(p["p99_seconds"] for p in v1)

        # The page redrew itself with the drop, without a reload.
        health = "document.querySelector('#health').innerText"
        assert browser.wait_for(f"{health}.includes('v1 labelled')", 60), browser.evaluate(health)
        assert browser.evaluate("window.__sameDocument") == "yes"
        assert int(browser.evaluate("document.body.dataset.refreshes")) >= 2
        assert browser.evaluate("document.querySelectorAll('#health svg.chart').length") >= 1
        page_text = browser.evaluate("document.body.innerText")
        for label in ("v1 labelled", "v1 estimated", "DRIFT", "out of range"):
            assert label in page_text, label
        shot = browser.screenshot(ARTIFACTS / "health-page.png")
        assert shot.stat().st_size > 20_000
        print(f"\nhealth page screenshot: {shot}")

        assert browser.console_errors == [], browser.console_errors
        foreign = [r for r in browser.requests if not r.startswith((url, "data:", "about:"))]
        assert foreign == [], foreign
    finally:
        if browser is not None:
            browser.close()
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(timeout=10)
        reader.join(timeout=5)
        if up.stdout is not None:
            up.stdout.close()
