"""POST /monitoring/alerts: admin token, golden Alertmanager payloads, every error branch."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from modelloop.control.http import create_alerts_router
from modelloop.control.retraining.policy import RetrainPolicy
from modelloop.control.retraining.trigger import DryRunTrigger
from modelloop.control.retraining.webhook import AlertHandler
from modelloop.serving.dataplane import DataPlane
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository
from modelloop.serving.rest.app import create_app
from modelloop.serving.settings import ServingSettings

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def golden(name: str) -> bytes:
    return (TESTDATA / f"alertmanager-{name}.json").read_bytes()


@pytest.fixture
def trigger() -> DryRunTrigger:
    return DryRunTrigger()


async def make_client(
    tmp_path: Path, trigger: DryRunTrigger | None, token: str | None = TOKEN
) -> httpx.AsyncClient:
    settings = ServingSettings(repo=tmp_path, admin_token=SecretStr(token) if token is not None else None)
    handler = None
    if trigger is not None:
        handler = AlertHandler(RetrainPolicy(900), trigger, model_exists=lambda m: m == "digits")
    # The route needs no model: the data plane is a real one over an empty repository.
    metrics = ServingMetrics(CollectorRegistry())
    dataplane = DataPlane(ModelRegistry(ModelRepository(tmp_path), settings, metrics=metrics), metrics)
    router = create_alerts_router(handler, token, settings.max_body_bytes)
    app = create_app(dataplane, settings, CollectorRegistry(), routers=[router])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(tmp_path: Path, trigger: DryRunTrigger) -> AsyncIterator[httpx.AsyncClient]:
    async with await make_client(tmp_path, trigger) as c:
        yield c


async def test_firing_alert_starts_one_retrain(client: httpx.AsyncClient, trigger: DryRunTrigger):
    r = await client.post("/monitoring/alerts", content=golden("firing"), headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {
        "alerts": [{"alertname": "ModelDriftDetected", "model": "digits", "result": "started"}]
    }
    assert [c[:2] for c in trigger.calls] == [("digits", "ModelDriftDetected")]
    again = await client.post("/monitoring/alerts", content=golden("firing"), headers=AUTH)
    assert again.json()["alerts"][0]["result"] == "duplicate"
    assert len(trigger.calls) == 1


async def test_resolved_alert_is_ignored(client: httpx.AsyncClient, trigger: DryRunTrigger):
    r = await client.post("/monitoring/alerts", content=golden("resolved"), headers=AUTH)
    assert r.status_code == 200 and r.json()["alerts"][0]["result"] == "resolved"
    assert trigger.calls == []


async def test_unknown_model_is_answered_200_with_the_reason(
    client: httpx.AsyncClient, trigger: DryRunTrigger
):
    r = await client.post("/monitoring/alerts", content=golden("unknown-model"), headers=AUTH)
    assert r.status_code == 200
    assert r.json()["alerts"] == [
        {"alertname": "ModelDriftDetected", "model": "no-such-model", "result": "unknown model"}
    ]
    assert trigger.calls == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (golden("malformed"), r"not an Alertmanager webhook payload: alerts\[0\]\.startsAt"),
        (b"{not json", "alert payload is not JSON"),
        (json.dumps({"version": "3"}).encode(), "unsupported webhook version '3'"),
    ],
)
async def test_malformed_is_400(client: httpx.AsyncClient, trigger: DryRunTrigger, body: bytes, message: str):
    r = await client.post("/monitoring/alerts", content=body, headers=AUTH)
    assert r.status_code == 400
    assert re.search(message, r.json()["error"])
    assert trigger.calls == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}, {"authorization": TOKEN}],
)
async def test_unsigned_is_401(client: httpx.AsyncClient, trigger: DryRunTrigger, headers: dict[str, str]):
    r = await client.post("/monitoring/alerts", content=golden("firing"), headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in r.json()["error"]
    assert trigger.calls == []


async def test_without_admin_token_the_route_is_off(tmp_path: Path, trigger: DryRunTrigger):
    async with await make_client(tmp_path, trigger, token=None) as c:
        r = await c.post("/monitoring/alerts", content=golden("firing"), headers=AUTH)
    assert r.status_code == 403 and r.json() == {
        "error": "admin routes are disabled: set MODELLOOP_ADMIN_TOKEN"
    }
    assert trigger.calls == []


async def test_without_a_handler_retraining_is_off(tmp_path: Path):
    async with await make_client(tmp_path, None) as c:
        r = await c.post("/monitoring/alerts", content=golden("firing"), headers=AUTH)
        unsigned = await c.post("/monitoring/alerts", content=golden("firing"))
    assert r.status_code == 503 and "retraining is off" in r.json()["error"]
    assert unsigned.status_code == 401  # the token is checked first: no information leaks


async def test_wrong_content_type_and_oversized_body(client: httpx.AsyncClient):
    r = await client.post(
        "/monitoring/alerts", content=golden("firing"), headers={**AUTH, "content-type": "text/plain"}
    )
    assert r.status_code == 415
    big = await client.post("/monitoring/alerts", content=b" " * (2 * 1024 * 1024), headers=AUTH)
    assert big.status_code == 413
