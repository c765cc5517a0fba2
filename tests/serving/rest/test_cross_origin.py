"""Cross-site writes: a POST from an origin the server does not allow is refused before any route.

Browsers send ``application/x-www-form-urlencoded`` (and bodiless-typed ``no-cors`` fetches)
cross-site without a CORS preflight, with the page's ``Origin``. Such a request must run
nothing, log nothing and count nothing, on the fast path and on FastAPI's routes alike,
while clients that send no ``Origin`` (curl, SDKs) and the allowed origins are unchanged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter

from modelloop.serving.rest.app import create_app
from modelloop.web import check_content_type

from ..edge_support import EdgeStack, serve, write_digits

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = [float(i % 17) for i in range(64)]
PREDICT = json.dumps({"instances": [ROW]}).encode()
INFER = json.dumps(
    {"id": "cross-1", "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
).encode()
FORM = {"content-type": "application/x-www-form-urlencoded"}
EVIL = "http://evil.example"
ALLOWED = "https://app.example"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[EdgeStack]:
    repo = tmp_path / "models"
    write_digits(repo, (1,))
    async with serve(repo, admin_token=TOKEN, cors_origins=[ALLOWED]) as stack:
        yield stack


def _mounted_router() -> tuple[APIRouter, list[str]]:
    """A route another package mounts (as monitoring mounts feedback), recording its calls."""
    router = APIRouter()
    calls: list[str] = []

    @router.post("/v1/models/{name}/feedback")
    async def feedback(name: str) -> dict[str, str]:
        calls.append(name)
        return {"stored": name}

    return router, calls


@pytest.fixture
async def app_and_calls(stack: EdgeStack) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    router, calls = _mounted_router()
    app = create_app(stack.dataplane, stack.settings, stack.prometheus, routers=[router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serving.local:8501") as client:
        yield client, calls


WRITES = [
    ("/v1/models/digits:predict", PREDICT),
    ("/v1/models/digits/versions/1:predict", PREDICT),
    ("/v1/models/digits:classify", PREDICT),
    ("/v1/models/digits:regress", PREDICT),
    ("/v2/models/digits/infer", INFER),
    ("/v2/models/digits/versions/1/infer", INFER),
    ("/v1/models/digits/feedback", b"{}"),
    ("/v2/repository/index", b"{}"),
    ("/v2/repository/models/digits/unload", b"{}"),
    ("/v2/repository/models/digits/load", b"{}"),
]


@pytest.mark.parametrize("origin", [EVIL, "null", "http://serving.local:8502", "https://app.example.evil"])
async def test_a_write_from_a_foreign_origin_is_refused_before_any_route(
    stack: EdgeStack, app_and_calls: tuple[httpx.AsyncClient, list[str]], origin: str
) -> None:
    client, calls = app_and_calls
    for path, body in WRITES:
        for headers in ({**FORM, "origin": origin}, {"origin": origin}, {**FORM, **AUTH, "origin": origin}):
            response = await client.post(path, content=body, headers=headers)
            assert response.status_code == 403, (path, response.text)
            assert "not in MODELLOOP_CORS_ORIGINS" in response.json()["error"]
            assert "x-request-id" not in response.headers
    # Nothing ran: no data plane call was counted, the mounted route never ran, the model
    # is still loaded.
    assert stack.requests() == {}
    assert calls == []
    assert stack.dataplane.model_ready("digits", None)


async def test_allowed_origins_the_server_itself_and_clients_without_origin_still_write(
    stack: EdgeStack, app_and_calls: tuple[httpx.AsyncClient, list[str]]
) -> None:
    client, calls = app_and_calls
    for headers in (
        {},  # curl, SDKs, server-side clients
        FORM,  # curl -d, as in TF Serving's own examples
        {"origin": ALLOWED},
        {"origin": ALLOWED + "/"},
        {"origin": "http://serving.local:8501"},  # the server's own pages (/docs)
    ):
        predict = await client.post("/v1/models/digits:predict", content=PREDICT, headers=headers)
        assert predict.status_code == 200, (headers, predict.text)
        infer = await client.post("/v2/models/digits/infer", content=INFER, headers=headers)
        assert infer.status_code == 200, (headers, infer.text)
        assert infer.json()["id"] == "cross-1"
        feedback = await client.post("/v1/models/digits/feedback", json={}, headers=headers)
        assert feedback.status_code == 200
    assert len(calls) == 5
    # Reads from any origin are answered as before (CORS decides what the page may see).
    assert (await client.get("/v1/models/digits", headers={"origin": EVIL})).status_code == 200


async def test_any_origin_when_the_operator_allows_every_origin(stack: EdgeStack) -> None:
    app = create_app(
        stack.dataplane, stack.settings.model_copy(update={"cors_origins": ["*"]}), stack.prometheus
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.post("/v1/models/digits:predict", content=PREDICT, headers={"origin": EVIL})
        assert response.status_code == 200


async def test_admin_routes_take_only_json(stack: EdgeStack) -> None:
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for path in (
            "/v2/repository/index",
            "/v2/repository/models/digits/load",
            "/v2/repository/models/digits/unload",
        ):
            for media in (
                "application/x-www-form-urlencoded",
                "text/plain",
                "multipart/form-data; boundary=x",
            ):
                response = await client.post(path, content=b"{}", headers={**AUTH, "content-type": media})
                assert response.status_code == 415, (path, media, response.text)
        assert stack.dataplane.model_ready("digits", None)
        # JSON, or no content type at all (tritonclient's repository calls), still work.
        index = await client.post(
            "/v2/repository/index", content=b"{}", headers={**AUTH, "content-type": "application/json"}
        )
        assert index.status_code == 200
        assert (await client.post("/v2/repository/index", headers=AUTH)).status_code == 200


def test_feedback_and_alert_bodies_must_be_json() -> None:
    """The routes that read their bodies with the default check (feedback, alerts) refuse forms."""
    from starlette.requests import Request

    def request(media: str) -> Request:
        return Request({"type": "http", "method": "POST", "headers": [(b"content-type", media.encode())]})

    with pytest.raises(Exception, match="unsupported content type 'application/x-www-form-urlencoded'"):
        check_content_type(request("application/x-www-form-urlencoded"))
    assert check_content_type(request("application/json")) is False
    assert check_content_type(request("application/x-www-form-urlencoded"), form=True) is False
