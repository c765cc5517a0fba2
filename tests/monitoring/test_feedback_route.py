"""POST /v1/models/{m}/feedback and the status page's verdicts, in-process over the real service."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelloop.control.http import HealthSection, create_feedback_router, create_health_router
from modelloop.control.service import MonitoringService
from modelloop.monitoring.settings import MonitoringSettings
from modelloop.monitoring.stores.engine import StoreUnavailable
from modelloop.monitoring.stores.records import FeedbackItem, FeedbackResult
from modelloop.serving.rest.app import create_app, render_status_page
from modelloop.serving.settings import ServingSettings
from modelloop.serving.shared_memory import SystemSharedMemory
from modelloop.serving.types import InferRequest, InferResponse, ModelState, Protocol, VersionStatus
from modelloop.tokens import TokenMatcher
from tests.monitoring.monhelpers import DigitsData, FakeCatalog, logged, write_version

URL = "/v1/models/digits/feedback"


class StubDataPlane:
    """Just what create_app and the status page call (no inference: the feedback route needs none)."""

    def __init__(self, catalog: FakeCatalog) -> None:
        self.catalog = catalog
        self.shared_memory = SystemSharedMemory()

    def server_metadata(self) -> dict:
        return {"name": "modelloop", "version": "test", "extensions": []}

    def model_names(self) -> list[str]:
        return self.catalog.model_names()

    def model_status(self, name: str) -> list[VersionStatus]:
        return self.catalog.statuses(name)

    def ready(self) -> bool:
        return True

    def repository_error(self) -> str:
        return ""


@pytest.fixture
def service(tmp_path: Path, digits_data: DigitsData) -> Iterator[MonitoringService]:
    repo = tmp_path / "repo"
    write_version(repo, "digits", 1, digits_data.baseline)
    catalog = FakeCatalog({"digits": {1: ModelState.AVAILABLE}, "<b>evil</b>": {1: ModelState.FAILED}})
    svc = MonitoringService(
        MonitoringSettings(state_dir=tmp_path / "state", min_rows=10, min_labels=2),
        repo=repo,
        catalog=catalog,
        registry=CollectorRegistry(),
    )
    # Logged predictions: "one" has 1 row, "three" has 3, predicted class 0 each.
    for rid, rows in (("one", 1), ("three", 3), ("two", 2), ("spare", 1)):
        probs = np.zeros((rows, 10), np.float32)
        probs[:, 0] = 1
        svc.recorder.write(
            [
                logged(
                    InferRequest(
                        "digits", {"pixels": np.zeros((rows, 64), np.float32)}, Protocol.V2_REST, id=rid
                    ),
                    InferResponse("digits", 1, {"probabilities": probs}, id=rid),
                )
            ]
        )
    try:
        yield svc
    finally:
        svc.stores.close()


@pytest.fixture
async def client(service: MonitoringService, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = ServingSettings(repo=tmp_path / "repo", max_body_bytes=4096)
    app = create_app(
        StubDataPlane(service.catalog),  # type: ignore[arg-type]
        settings,
        CollectorRegistry(),
        routers=[create_feedback_router(service, settings.max_body_bytes), create_health_router(service)],
        status_sections=[HealthSection(service)],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def labels(service: MonitoringService) -> list[tuple[int | float, int | float]]:
    return sorted((r.predicted, r.target) for r in service.stores.feedback.recent_labelled("digits", 1, 100))


async def test_accepts_targets_and_the_one_row_form(client: httpx.AsyncClient, service: MonitoringService):
    r = await client.post(
        URL,
        json={
            "feedback": [
                {"request_id": "three", "targets": [0, 1, 2]},
                {"request_id": "one", "target": 0},
                {"request_id": "nobody", "target": 1},
                {"request_id": "two", "targets": [1]},
            ]
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == ["three", "one"] and body["unknown"] == ["nobody"] and body["duplicate"] == []
    assert body["invalid"] == {"two": "expected 2 targets (one per row of the prediction), got 1"}
    assert labels(service) == [(0, 0), (0, 0), (0, 1), (0, 2)]


async def test_a_duplicate_is_409_and_keeps_the_first(client: httpx.AsyncClient, service: MonitoringService):
    assert (
        await client.post(URL, json={"feedback": [{"request_id": "one", "target": 3}]})
    ).status_code == 200
    r = await client.post(URL, json={"feedback": [{"request_id": "one", "target": 4}]})
    assert r.status_code == 409
    assert r.json()["duplicate"] == ["one"] and "already labelled" in r.json()["error"]
    assert labels(service) == [(0, 3)]


@pytest.mark.parametrize(
    ("feedback", "status", "message"),
    [
        ([{"request_id": "nobody", "target": 1}], 404, "unknown request ids"),
        ([{"request_id": "three", "targets": [1, 2]}], 400, "invalid targets"),
        ([{"request_id": "one", "target": 12}], 400, "invalid targets"),
        ([{"request_id": "one", "target": "seven"}], 400, "invalid targets"),
        ([{"request_id": "one", "target": True}], 400, "invalid targets"),
        ([{"request_id": "one", "target": None}], 400, "invalid targets"),
    ],
)
async def test_nothing_accepted_is_a_clear_4xx(
    client: httpx.AsyncClient, service: MonitoringService, feedback, status, message
):
    await client.post(URL, json={"feedback": [{"request_id": "spare", "target": 5}]})
    r = await client.post(URL, json={"feedback": feedback})
    assert r.status_code == status and message in r.json()["error"]
    assert labels(service) == [(0, 5)]  # what was accepted before is unchanged


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[]", "the body must be"),
        (b'{"feedback": []}', "non-empty list"),
        (b'{"feedback": {"request_id": "one"}}', "non-empty list"),
        (b'{"feedback": [1]}', "must be an object"),
        (b'{"feedback": [{"request_id": "one", "target": 1}], "extra": 1}', "the body must be"),
        (b'{"feedback": [{"request_id": "one", "tagret": 1}]}', "unknown key(s) 'tagret'"),
        (b'{"feedback": [{"request_id": "one"}]}', "exactly one of targets"),
        (b'{"feedback": [{"request_id": "one", "target": 1, "targets": [1]}]}', "exactly one of targets"),
        (b'{"feedback": [{"request_id": "one", "target": [1]}]}', "single value"),
        (b'{"feedback": [{"request_id": "one", "targets": 1}]}', "must be a list"),
        (b'{"feedback": [{"request_id": 5, "target": 1}]}', "request_id must be"),
        (b'{"feedback": [{"request_id": "", "target": 1}]}', "request_id must be"),
    ],
)
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, service: MonitoringService, body, message):
    r = await client.post(URL, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert labels(service) == []


async def test_unknown_model_is_404(client: httpx.AsyncClient):
    r = await client.post("/v1/models/nope/feedback", json={"feedback": [{"request_id": "one", "target": 1}]})
    assert r.status_code == 404 and "nope" in r.json()["error"]


async def test_body_limit_content_type_and_gzip(client: httpx.AsyncClient, service: MonitoringService):
    big = {"feedback": [{"request_id": "one", "target": 1}] * 500}
    assert (await client.post(URL, json=big)).status_code == 413
    r = await client.post(URL, content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    packed = gzip.compress(b'{"feedback": [{"request_id": "one", "target": 6}]}')
    r = await client.post(URL, content=packed, headers={"content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == ["one"]


async def test_store_down_is_503_and_nothing_is_acknowledged(
    client: httpx.AsyncClient, service: MonitoringService
):
    def down(model: str, items: list[FeedbackItem], **_: object) -> FeedbackResult:
        raise StoreUnavailable("postgresql 127.0.0.1:5432/modelloop: connection refused")

    service.stores.feedback.add_feedback = down  # type: ignore[method-assign]
    r = await client.post(URL, json={"feedback": [{"request_id": "one", "target": 1}]})
    assert r.status_code == 503
    assert r.json() == {
        "error": "feedback store unavailable: postgresql 127.0.0.1:5432/modelloop: connection refused"
    }


async def test_monitoring_off_is_501(tmp_path: Path, service: MonitoringService):
    settings = ServingSettings(repo=tmp_path)
    app = create_app(
        StubDataPlane(service.catalog),  # type: ignore[arg-type]
        settings,
        CollectorRegistry(),
        routers=[create_feedback_router(None, settings.max_body_bytes)],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.post(URL, json={"feedback": [{"request_id": "one", "target": 1}]})
    assert r.status_code == 501 and "monitoring is disabled" in r.json()["error"]


async def test_status_page_shows_drift_and_accuracy(
    client: httpx.AsyncClient, service: MonitoringService, digits_data: DigitsData
):
    page = (await client.get("/")).text
    assert "digits" in page and "AVAILABLE" in page and 'href="/docs"' in page and 'href="/metrics"' in page
    assert "&lt;b&gt;evil&lt;/b&gt;" in page and "<b>evil</b>" not in page
    # A card per model with the slot its verdicts go to, and the health section below.
    assert '<article class="card model-card" data-model="digits">' in page
    assert 'data-slot="verdicts"' in page and '<section id="health"' in page
    await client.post(URL, json={"feedback": [{"request_id": "three", "targets": [0, 0, 1]}]})
    service.evaluate_once()
    # The verdicts come with the health fragment, which the page moves into the cards.
    fragment = (await client.get("/monitoring/health")).text
    assert '<div class="verdicts" data-model="digits">' in fragment
    assert "accuracy 0.667" in fragment and "3 labels" in fragment
    assert "collecting (7/10 rows)" in fragment
    assert 'data-verdict="labelers">no labeler quarantined' in fragment
    html_without = render_status_page(StubDataPlane(service.catalog), sections=[HealthSection(None)])  # type: ignore[arg-type]
    assert "Monitoring is off" in html_without


@pytest.fixture
async def guarded(service: MonitoringService, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The feedback routes with two labelers' tokens configured."""
    settings = ServingSettings(repo=tmp_path / "repo")
    labelers = TokenMatcher({"team-a": "token-a", "team-b": "token-b"})
    app = create_app(
        StubDataPlane(service.catalog),  # type: ignore[arg-type]
        settings,
        CollectorRegistry(),
        routers=[create_feedback_router(service, settings.max_body_bytes, labelers)],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


async def test_labelers_authenticate_and_their_source_is_stored(
    guarded: httpx.AsyncClient, service: MonitoringService
):
    body = {"feedback": [{"request_id": "one", "target": 0}]}
    missing = await guarded.post(URL, json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer token-c", "Basic token-a", "token-a"):
        r = await guarded.post(URL, json=body, headers={"authorization": header})
        assert r.status_code == (403 if header.startswith("Bearer") else 401), header
    ok = await guarded.post(URL, json=body, headers={"authorization": "Bearer token-b"})
    assert ok.status_code == 200 and ok.json()["source"] == "team-b" and ok.json()["quarantined"] is False
    assert service.stores.feedback.label_sources("digits")["team-b"].labels == 1


async def test_a_quarantined_source_is_stored_marked_and_reported(
    guarded: httpx.AsyncClient, service: MonitoringService
):
    # 60 confident predictions of class 0 that team-a calls 1: a targeted flip.
    ids = [f"flip{i}" for i in range(61)]
    for rid in ids:
        probs = np.zeros((1, 10), np.float32)
        probs[0, 0] = 1
        service.recorder.write(
            [
                logged(
                    InferRequest(
                        "digits", {"pixels": np.zeros((1, 64), np.float32)}, Protocol.V2_REST, id=rid
                    ),
                    InferResponse("digits", 1, {"probabilities": probs}, id=rid),
                )
            ]
        )
    team_a = {"authorization": "Bearer token-a"}
    flips = {"feedback": [{"request_id": rid, "target": 1} for rid in ids[:60]]}
    assert (await guarded.post(URL, json=flips, headers=team_a)).json()["quarantined"] is False
    verdict = service.assess_sources("digits", 1)["team-a"]
    assert verdict.quarantined and "as '1' (60 labels)" in verdict.reasons[0]
    later = await guarded.post(URL, json={"feedback": [{"request_id": ids[60], "target": 1}]}, headers=team_a)
    assert later.status_code == 200 and later.json() == {
        "accepted": [ids[60]],
        "unknown": [],
        "duplicate": [],
        "invalid": {},
        "ambiguous": {},
        "source": "team-a",
        "quarantined": True,
    }
    # The report names the labelers: it is theirs (and the admin's) to read.
    assert (await guarded.get(f"{URL}/sources")).status_code == 401
    assert (await guarded.get(f"{URL}/sources", headers={"authorization": "Bearer nope"})).status_code == 403
    report = (await guarded.get(f"{URL}/sources", headers=team_a)).json()
    (entry,) = report["sources"]
    assert report["model"] == "digits" and report["champion_version"] == 1
    assert entry["source"] == "team-a" and entry["quarantined"] is True
    assert entry["stored_labels"] == 61 and entry["labels_while_quarantined"] == 1
    # The checks' figures are those of the last label check; the stored counts are current.
    assert entry["relabels"][0] == {"predicted": "0", "target": "1", "labels": 60, "rate": 1.0}
    # Its labels no longer count towards accuracy.
    excluded = service.quarantined_sources("digits")
    assert service.stores.feedback.recent_labelled("digits", 1, 100, exclude_sources=excluded) == []
    assert (await guarded.get("/v1/models/nope/feedback/sources", headers=team_a)).status_code == 404


async def test_the_admin_reads_the_sources_report_and_strangers_do_not(
    service: MonitoringService, tmp_path: Path
) -> None:
    settings = ServingSettings(repo=tmp_path / "repo")
    router = create_feedback_router(service, settings.max_body_bytes, TokenMatcher({}), "admin-token-0001")
    app = create_app(StubDataPlane(service.catalog), settings, CollectorRegistry(), routers=[router])  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get(f"{URL}/sources")).status_code == 401
        wrong = await client.get(f"{URL}/sources", headers={"authorization": "Bearer admin-token-0002"})
        assert wrong.status_code == 403 and "team" not in wrong.text
        ok = await client.get(f"{URL}/sources", headers={"authorization": "Bearer admin-token-0001"})
        assert ok.status_code == 200 and ok.json()["model"] == "digits"
