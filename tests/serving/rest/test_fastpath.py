"""The ASGI fast path answers predict and infer exactly as the FastAPI routes do, and only those.

Every request below goes once through the app (fast path in front) and once straight to
FastAPI's router (the declared routes), over the same real data plane with fake
runtimes; status, body and headers must agree (fresh request ids aside).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from modelloop.serving.rest.app import create_app
from modelloop.serving.rest.fastpath import PredictFastPath

from ..edge_support import EdgeStack, serve, write_digits, write_multi

ROW = [float(i % 17) for i in range(64)]
V2 = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
FRESH_ID = re.compile(r"[0-9a-f]{32}")

CASES: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("/v1/models/digits:predict", {"instances": [ROW]}, {}),
    ("/v1/models/digits:predict", {"inputs": {"pixels": [ROW, ROW]}}, {"x-request-id": "mine-1"}),
    ("/v1/models/digits/versions/1:predict", {"instances": [ROW]}, {}),
    ("/v1/models/digits/labels/stable:predict", {"instances": [ROW]}, {}),
    ("/v1/models/digits/versions/x:predict", {"instances": [ROW]}, {}),
    ("/v1/models/digits:classify", {"instances": [ROW]}, {}),
    ("/v1/models/digits", {"instances": [ROW]}, {}),
    ("/v1/models/nope:predict", {"instances": [ROW]}, {}),
    ("/v1/models/digits:predict", {"instances": [[1.0]]}, {}),
    (
        "/v1/models/digits:predict",
        {"instances": [ROW]},
        {"X-Request-ID": "Mine-2", "Content-Type": "Application/JSON"},
    ),
    ("/v1/models/digits:predict", {"instances": [ROW]}, {"content-type": "text/plain"}),
    ("/v1/models/digits/metadata", {}, {}),
    ("/v1/models/digits/feedback", {"feedback": []}, {}),
    ("/v2/models/digits/infer", V2, {}),
    ("/v2/models/digits/versions/2/infer", {**V2, "id": "oip-7"}, {}),
    ("/v2/models/digits/versions/9/infer", V2, {}),
    ("/v2/models/digits/versions/-1/infer", V2, {}),
    (
        "/v2/models/multi/infer",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
        {},
    ),
    ("/v2/models/digits/infer", {"inputs": "nope"}, {}),
    ("/v2/models//infer", V2, {}),
    ("/v2/models/digits/ready/infer", V2, {}),
    ("/v2/repository/index", {}, {}),
]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_digits(repo, (1, 2), version_labels={"stable": 1})
    write_multi(repo)
    return repo


@pytest.fixture
async def stack(repo: Path) -> AsyncIterator[EdgeStack]:
    async with serve(repo) as stack:
        yield stack


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _normalised(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    fresh = headers.get("x-request-id", "")
    if FRESH_ID.fullmatch(fresh):
        headers["x-request-id"] = "<fresh>"
    try:
        body: Any = response.json()
    except ValueError:
        body = response.content
    if isinstance(body, dict) and FRESH_ID.fullmatch(str(body.get("id", ""))):
        body["id"] = "<fresh>"
    return response.status_code, body, headers


@pytest.mark.parametrize(("path", "body", "headers"), CASES)
async def test_the_fast_path_answers_like_the_declared_routes(
    stack: EdgeStack, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
    routes_only = functools.partial(FastAPI.__call__, app)  # FastAPI itself, without the front
    content = json.dumps(body).encode()
    async with _client(app) as fast, _client(routes_only) as routed:
        via_fast = await fast.post(path, content=content, headers=headers)
        via_routes = await routed.post(path, content=content, headers=headers)
    assert _normalised(via_fast) == _normalised(via_routes)


async def _raw_call(app: Any, path: str, pieces: list[dict[str, Any]]) -> tuple[int, bytes, list[Any]]:
    """Sends ``pieces`` as the ASGI receive messages of one POST; returns status, body and headers."""
    body = b"".join(p.get("body", b"") for p in pieces)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"x-request-id", b"first"),
            (b"x-request-id", b"second"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    queue = list(pieces)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, *rest = sent
    return start["status"], b"".join(m.get("body", b"") for m in rest), sorted(start["headers"])


@pytest.mark.parametrize("split", [1, 3, 7])
async def test_a_body_in_pieces_and_a_repeated_header_read_alike(stack: EdgeStack, split: int) -> None:
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
    routes_only = functools.partial(FastAPI.__call__, app)
    body = json.dumps({"instances": [ROW]}).encode()
    step = -(-len(body) // split)
    pieces = [
        {"type": "http.request", "body": body[i : i + step], "more_body": i + step < len(body)}
        for i in range(0, len(body), step)
    ]
    fast = await _raw_call(app, "/v1/models/digits:predict", [dict(p) for p in pieces])
    routed = await _raw_call(routes_only, "/v1/models/digits:predict", [dict(p) for p in pieces])
    assert fast == routed
    assert fast[0] == 200 and (b"x-request-id", b"first") in fast[2]


async def test_a_client_gone_mid_body_is_answered_alike(stack: EdgeStack) -> None:
    before = stack.count("digits", "", "tfserving_rest", "CANCELLED")
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
    routes_only = functools.partial(FastAPI.__call__, app)
    half = [{"type": "http.request", "body": b'{"instances": [', "more_body": True}]
    fast = await _raw_call(app, "/v1/models/digits:predict", [dict(p) for p in half])
    routed = await _raw_call(routes_only, "/v1/models/digits:predict", [dict(p) for p in half])
    assert fast[:2] == routed[:2]
    # Counted as cancelled (499), not as the model failing.
    assert fast[0] == 499 and b"before the request body was complete" in fast[1]
    assert stack.count("digits", "", "tfserving_rest", "CANCELLED") == before + 2


class _Recorder:
    """An ASGI app that records the paths it is asked for and answers 204."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(f"{scope['method']} {scope['path']}")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def test_only_predict_and_infer_paths_take_the_fast_path(stack: EdgeStack) -> None:
    inner = _Recorder()
    app = PredictFastPath(inner, dataplane=stack.dataplane, max_body_bytes=1 << 20)
    served = [
        "/v1/models/digits:predict",
        "/v1/models/digits/versions/1:predict",
        "/v1/models/digits/labels/stable:predict",
        "/v2/models/digits/infer",
        "/v2/models/digits/versions/1/infer",
    ]
    passed = [
        "/v1/models/digits/feedback",
        "/v1/models/digits/versions/1/extra:predict",
        "/v2/models/digits/ready",
        "/v2/models//infer",
        "/v2/models/a/b/infer",
        "/v2/repository/models/digits/load",
        "/monitoring/alerts",
    ]
    async with _client(app) as client:
        for path in served:
            assert (await client.post(path, json={"instances": [ROW]})).status_code != 204, path
        for path in passed:
            assert (await client.post(path, json={})).status_code == 204, path
        assert (await client.get("/v1/models/digits:predict")).status_code == 204
    assert inner.paths == [f"POST {p}" for p in passed] + ["GET /v1/models/digits:predict"]


async def test_cors_headers_reach_fast_path_answers(stack: EdgeStack) -> None:
    settings = stack.settings.model_copy(update={"cors_origins": ["https://app.example"]})
    app = create_app(stack.dataplane, settings, stack.prometheus)
    origin = {"Origin": "https://app.example"}
    async with _client(app) as client:
        for path, body in (
            ("/v1/models/digits:predict", {"instances": [ROW]}),
            ("/v2/models/digits/infer", V2),
        ):
            response = await client.post(path, json=body, headers=origin)
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "https://app.example"
            assert "x-request-id" in response.headers["access-control-expose-headers"]
        other = await client.post(
            "/v2/models/nope/infer", json=V2, headers={"Origin": "https://evil.example"}
        )
        # A write from an origin CORS does not allow is refused before the fast path runs.
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


async def test_predict_and_infer_keep_their_openapi_entries(stack: EdgeStack) -> None:
    paths = create_app(stack.dataplane, stack.settings, stack.prometheus).openapi()["paths"]
    for path in (
        "/v1/models/{model_method}",
        "/v1/models/{model}/versions/{version_method}",
        "/v1/models/{model}/labels/{label_method}",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
    ):
        assert "post" in paths[path], path
