"""A page on another origin, in headless Chromium, tries to predict and label through a real server.

Browsers send ``application/x-www-form-urlencoded`` POSTs cross-site without a CORS
preflight: an HTML form, or a ``no-cors`` fetch with a JSON text as its body. The page
(served from a second loopback port, so a different origin) fires both at ``:predict``,
``/infer`` (with a body ``id``) and the feedback route of a server that has no labeler
tokens. Every one must be answered 403 and leave no trace: no request counted, nothing
logged, no label stored. The server's own status page, same origin, still predicts.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.browser import open_browser
from tests.e2e.serverproc import ServerProcess, start_server

pytestmark = pytest.mark.slow

ROW = [float(i % 17) for i in range(64)]


@pytest.fixture
def server(tmp_path: Path, digits_repo: Path) -> Iterator[ServerProcess]:
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    env = {"MODELLOOP_CORS_ORIGINS": '["https://app.example"]'}
    env.update({k: "" for k in ("MODELLOOP_FEEDBACK_TOKEN", "MODELLOOP_FEEDBACK_TOKENS") if k in os.environ})
    proc = start_server(repo, "--state-dir", str(tmp_path / "state"), env=env)
    try:
        yield proc
    finally:
        proc.stop()


def _page(rest: str) -> bytes:
    predict = json.dumps({"instances": [ROW]})
    infer = json.dumps(
        {"id": "csrf-1", "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
    )
    feedback = json.dumps({"feedback": [{"request_id": "csrf-1", "target": 3}]})
    # A form's fields are percent-encoded; the name/value trick is what attackers try.
    field = json.dumps({"instances": [ROW], "pad": ""})[:-2]
    script = f"""
const form = 'application/x-www-form-urlencoded';
async function post(url, body) {{
  await fetch(url, {{method: 'POST', mode: 'no-cors', headers: {{'content-type': form}}, body}});
}}
(async () => {{
  await post({json.dumps(rest + "/v1/models/digits:predict")}, {json.dumps(predict)});
  await post({json.dumps(rest + "/v2/models/digits/infer")}, {json.dumps(infer)});
  await new Promise(r => setTimeout(r, 1500));  // the prediction log writes off the request path
  await post({json.dumps(rest + "/v1/models/digits/feedback")}, {json.dumps(feedback)});
  document.getElementById('f').submit();
  window.fired = true;
}})();
"""
    return f"""<!doctype html><html><body>
<form id="f" method="POST" action="{rest}/v1/models/digits:predict" target="sink">
<input type="hidden" name='{field}' value='"}}'></form>
<iframe name="sink"></iframe>
<script>{script}</script></body></html>""".encode()


def _digits_requests(rest: str) -> float:
    text = httpx.get(f"{rest}/metrics", timeout=10).text
    pattern = re.compile(r'^modelloop_requests_total\{[^}]*model="digits"[^}]*\} (\S+)$', re.M)
    return sum(float(value) for value in pattern.findall(text))


def test_a_cross_site_page_can_neither_predict_nor_label(server: ServerProcess) -> None:
    rest = server.rest_url
    page = _page(rest)

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    browser = open_browser()
    try:
        browser.call("Page.navigate", url=f"http://127.0.0.1:{evil.server_address[1]}/")
        assert browser.wait_for("window.fired === true", timeout=60)
        targets = ("digits:predict", "digits/infer", "digits/feedback")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            browser.evaluate("1")  # pumps the DevTools events
            seen = [(url, status) for url, status in browser.responses if url.startswith(rest)]
            if len(seen) >= 4:
                break
            time.sleep(0.2)
        print("cross-site responses:", seen)
        assert len(seen) >= 4 and all(url.endswith(targets) for url, _ in seen), seen
        assert {status for _, status in seen} == {403}, seen
        # Nothing reached the data plane (it counts every call, answered or refused) ...
        assert _digits_requests(rest) == 0
        # ... so nothing was logged, and no label could be stored for the page's id.
        label = httpx.post(
            f"{rest}/v1/models/digits/feedback",
            json={"feedback": [{"request_id": "csrf-1", "target": 3}]},
            timeout=10,
        )
        assert label.status_code != 200 and "csrf-1" not in label.json().get("accepted", []), label.text

        # The server's own page is the same origin: its writes are answered.
        browser.responses.clear()
        browser.call("Page.navigate", url=f"{rest}/")
        assert browser.wait_for("document.readyState === 'complete'", timeout=30)
        same_origin = browser.call(
            "Runtime.evaluate",
            expression=(
                "fetch('/v1/models/digits:predict', {method: 'POST', headers: {'content-type': "
                f"'application/json'}}, body: {json.dumps(json.dumps({'instances': [ROW]}))}}})"
                ".then(r => r.status)"
            ),
            awaitPromise=True,
            returnByValue=True,
        )
        assert same_origin["result"]["value"] == 200, same_origin
        assert _digits_requests(rest) == 1
    finally:
        browser.close()
        evil.shutdown()
        evil.server_close()
        thread.join(timeout=10)
