"""``simulate`` against a scripted peer: how it treats refusals, late logging and pacing.

The peer is a real HTTP server on loopback whose answers each test scripts, so the cases a
real server produces only by chance (a label that arrives before its prediction is logged,
an answer that is not JSON) happen every time.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from modelloop.monitoring.simulate import SimulationError, simulate

# (path, body) -> (status, content type, payload bytes)
Script = Callable[[str, Any], tuple[int, str, bytes]]


def _json(status: int, payload: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload).encode()


def _predictions(body: Any) -> tuple[int, str, bytes]:
    return _json(200, {"predictions": [[1.0] + [0.0] * 9 for _ in body["instances"]]})


@pytest.fixture
def peer() -> Iterator[Callable[[Script], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(script: Script) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                status, media, data = script(self.path, body)
                self.send_response(status)
                self.send_header("content-type", media)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_labels_that_arrive_before_their_prediction_is_logged_are_sent_again(peer) -> None:
    asked: dict[str, int] = {}

    def script(path: str, body: Any) -> tuple[int, str, bytes]:
        if path.endswith(":predict"):
            return _predictions(body)
        # Each id is unknown the first time it is labelled, then accepted.
        accepted, unknown = [], []
        for item in body["feedback"]:
            rid = item["request_id"]
            asked[rid] = asked.get(rid, 0) + 1
            (accepted if asked[rid] > 1 else unknown).append(rid)
        status = 200 if accepted else 404
        return _json(status, {"accepted": accepted, "unknown": unknown, "duplicate": [], "invalid": {}})

    out = io.StringIO()
    result = simulate(peer(script), requests=4, batch=2, out=out)
    normal = result["phases"]["normal"]
    assert normal["feedback_accepted"] == 4 and normal["rows"] == 8
    assert sorted(asked.values()) == [2, 2, 2, 2]
    assert "4 labelled requests accepted" in out.getvalue()


def test_a_refused_prediction_stops_the_simulation_with_the_servers_answer(peer) -> None:
    url = peer(lambda path, body: _json(404, {"error": "model 'digits' is not in the repository"}))
    with pytest.raises(SimulationError, match=r"predict refused \(404\): .*not in the repository"):
        simulate(url, requests=1, out=io.StringIO())


def test_an_answer_that_is_not_json_is_shown_as_text(peer) -> None:
    url = peer(lambda path, body: (502, "text/html", b"<html>bad gateway</html>"))
    with pytest.raises(SimulationError, match=r"predict refused \(502\): .*bad gateway"):
        simulate(url, requests=1, out=io.StringIO())


def test_a_refused_label_batch_stops_the_simulation(peer) -> None:
    def script(path: str, body: Any) -> tuple[int, str, bytes]:
        if path.endswith(":predict"):
            return _predictions(body)
        return _json(501, {"error": "monitoring is disabled on this server"})

    with pytest.raises(SimulationError, match=r"feedback refused \(501\): .*monitoring is disabled"):
        simulate(peer(script), requests=2, out=io.StringIO())


def test_the_rate_paces_the_requests(peer) -> None:
    sent: list[float] = []

    def script(path: str, body: Any) -> tuple[int, str, bytes]:
        if path.endswith(":predict"):
            sent.append(time.monotonic())
            return _predictions(body)
        ids = [f["request_id"] for f in body["feedback"]]
        return _json(200, {"accepted": ids, "unknown": [], "duplicate": [], "invalid": {}})

    simulate(peer(script), requests=5, rate=20.0, out=io.StringIO())
    # Five requests at 20 per second take at least four intervals of 50 ms (a lower bound:
    # pacing only ever waits).
    assert len(sent) == 5 and sent[-1] - sent[0] >= 4 / 20 - 0.01
