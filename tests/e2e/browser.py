"""Headless Chromium driven over the DevTools protocol, with the network off but for loopback.

Chromium (``tests.tools.find_chromium``: Debian's ``chromium``, Ubuntu's
``chromium-browser``, Google's builds, or ``$CHROMIUM``) starts with
``--remote-debugging-port=0`` and a fresh profile; the test talks to it over the page's
DevTools WebSocket (``websocket-client``). Host names other than 127.0.0.1 resolve to
nothing (``--host-resolver-rules``), so a page that needed a CDN would fail to load it,
and every request the page makes is recorded, as is every console message and uncaught
exception. The browser is stopped by its PID.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websocket

from tests.tools import require_chromium


@dataclass
class Browser:
    """One headless page: navigate, evaluate, screenshot; console and requests recorded."""

    proc: subprocess.Popen[bytes]
    profile: Path
    ws: websocket.WebSocket
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    responses: list[tuple[str, int]] = field(default_factory=list)
    """``(url, status)`` of every response the page received, opaque ones included."""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _handle(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.responseReceived":
            self.responses.append((params["response"]["url"], int(params["response"]["status"])))

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Sends one DevTools command and returns its result, recording events meanwhile."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self._handle(message)
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> bool:
        """Polls until the expression is truthy in the page."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.25)
        return bool(self.evaluate(expression))

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        data = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Closes the socket and stops the browser by its PID."""
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


def open_browser(width: int = 1400, height: int = 1200) -> Browser:
    """Starts headless Chromium with one blank page and the DevTools domains enabled.

    A missing Chromium fails the test under CI and skips it elsewhere (``require_chromium``).
    """
    chromium = require_chromium()
    profile = Path(tempfile.mkdtemp(prefix="modelloop-chromium-"))
    proc = subprocess.Popen(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--window-size={width},{height}",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with httpx.Client(trust_env=False, timeout=10) as client:
            targets = client.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t.get("type") == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        browser = Browser(proc, profile, ws)
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable")
        return browser
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
        raise
