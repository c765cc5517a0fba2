"""The REST app over a FakeDataPlane: routing, translation, headers and every error branch."""

from __future__ import annotations

import gzip
import json
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from pydantic import SecretStr

from modelloop.serving.errors import (
    ErrorCode,
    InferenceFailed,
    ModelNotReady,
    QueueFull,
)
from modelloop.serving.rest.app import create_app
from modelloop.serving.settings import ServingSettings
from modelloop.serving.types import Protocol

from .fakes_rest import FakeDataPlane

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
TOKEN = "s3cret-token"
ROW = [float(i % 17) for i in range(64)]


def make_settings(tmp_path: Path, **overrides: object) -> ServingSettings:
    return ServingSettings(repo=tmp_path, **overrides)


@pytest.fixture
def dataplane() -> FakeDataPlane:
    return FakeDataPlane()


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("modelloop_probe", "A metric to find in /metrics.", registry=registry).inc()
    return registry


async def client_for(
    dataplane: FakeDataPlane, settings: ServingSettings, registry: CollectorRegistry | None = None
) -> httpx.AsyncClient:
    app = create_app(dataplane, settings, registry or CollectorRegistry())  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(
    dataplane: FakeDataPlane, tmp_path: Path, registry: CollectorRegistry
) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(dataplane, make_settings(tmp_path, admin_token=TOKEN), registry) as c:
        yield c


def assert_error(response: httpx.Response, status: int, match: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    assert re.search(match, body["error"]), body["error"]
    return body["error"]


# -- TF Serving /v1 ---------------------------------------------------------------------


async def test_predict_golden_row_format(client: httpx.AsyncClient, dataplane: FakeDataPlane) -> None:
    body = (TESTDATA / "tfserving-predict-request.json").read_bytes()
    response = await client.post("/v1/models/digits:predict", content=body)
    assert response.status_code == 200, response.text
    rid = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    rows = json.loads(body)["instances"]
    assert response.json() == {"predictions": [row[:10] for row in rows]}
    request = dataplane.requests[-1]
    assert (request.model, request.version, request.label, request.id) == ("digits", None, None, rid)
    assert request.protocol is Protocol.TFSERVING_REST


async def test_predict_columnar_format(client: httpx.AsyncClient) -> None:
    body = (TESTDATA / "tfserving-predict-columnar-request.json").read_bytes()
    response = await client.post("/v1/models/digits:predict", content=body)
    assert response.status_code == 200
    rows = json.loads(body)["inputs"]["pixels"]
    assert response.json() == {"outputs": [row[:10] for row in rows]}


async def test_predict_multi_output_rows_and_b64(client: httpx.AsyncClient) -> None:
    body = {"instances": [{"a": [1, 2], "s": {"b64": "aGk="}}, {"a": [3, 4], "s": "yo"}]}
    response = await client.post("/v1/models/multi:predict", json=body)
    assert response.json() == {"predictions": [{"y": 3.0, "echo": "hi"}, {"y": 7.0, "echo": "yo"}]}


async def test_predict_version_and_label_paths(client: httpx.AsyncClient, dataplane: FakeDataPlane) -> None:
    ok = await client.post("/v1/models/digits/versions/2:predict", json={"instances": [ROW]})
    assert ok.status_code == 200 and dataplane.requests[-1].version == 2
    ok = await client.post("/v1/models/digits/labels/stable:predict", json={"instances": [ROW]})
    assert ok.status_code == 200 and dataplane.requests[-1].label == "stable"
    # TF Serving matches paths case-insensitively; the method at least.
    ok = await client.post("/v1/models/digits:PREDICT", json={"instances": [ROW]})
    assert ok.status_code == 200


async def test_request_id_kept_or_replaced(client: httpx.AsyncClient, dataplane: FakeDataPlane) -> None:
    kept = await client.post(
        "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"x-request-id": "client-42"}
    )
    assert kept.headers["x-request-id"] == "client-42" and dataplane.requests[-1].id == "client-42"
    for bad in ["x" * 129, "tab\there"]:
        replaced = await client.post(
            "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"x-request-id": bad}
        )
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    error = await client.post("/v1/models/digits:predict", content=b"{", headers={"x-request-id": "e-1"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "e-1"


@pytest.mark.parametrize("method", ["classify", "regress"])
async def test_classify_and_regress_are_501(
    client: httpx.AsyncClient, dataplane: FakeDataPlane, method: str
) -> None:
    response = await client.post(f"/v1/models/digits:{method}", json={"examples": [{"x": 1}]})
    assert_error(response, 501, f":{method} is not implemented")
    assert "x-request-id" in response.headers
    assert dataplane.rejected[-1] == ("digits", Protocol.TFSERVING_REST, ErrorCode.UNIMPLEMENTED)


@pytest.mark.parametrize(
    ("path", "status", "match"),
    [
        ("/v1/models/digits:explain", 404, "Malformed request"),
        ("/v1/models/digits", 404, "Malformed request"),
        ("/v1/models/:predict", 404, "Malformed request"),
        ("/v1/models/digits/versions/abc:predict", 400, 'non-negative integer, got "abc"'),
        ("/v1/models/digits/versions/-1:predict", 400, "non-negative integer"),
        ("/v1/models/digits/versions/9:predict", 404, "no version 9"),
        ("/v1/models/digits/labels/canary:predict", 404, "no version label 'canary'"),
        ("/v1/models/nope:predict", 404, "model 'nope' not found"),
    ],
)
async def test_bad_predict_paths(
    client: httpx.AsyncClient, dataplane: FakeDataPlane, path: str, status: int, match: str
) -> None:
    response = await client.post(path, json={"instances": [ROW]})
    assert_error(response, status, match)
    assert "x-request-id" in response.headers
    assert dataplane.rejected and dataplane.requests == []


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b'"instances"', 400, "must be a JSON object"),
        (json.dumps({"instances": [ROW], "inputs": [ROW]}).encode(), 400, "both"),
        (json.dumps({"instances": [ROW[:3], ROW[:2]]}).encode(), 400, "ragged"),
        (json.dumps({"instances": [["a"] * 64]}).encode(), 400, "string"),
        (json.dumps({"instances": [[None] * 64]}).encode(), 400, "null"),
        (json.dumps({"instances": [[True] * 64]}).encode(), 400, "boolean"),
        (json.dumps({"instances": []}).encode(), 400, "empty batch"),
        (json.dumps({"instances": [ROW], "signature_name": "other"}).encode(), 404, "signature name"),
        (json.dumps({"inputs": {"nope": [ROW]}}).encode(), 400, 'unknown input "nope"'),
    ],
)
async def test_bad_predict_bodies(
    client: httpx.AsyncClient, dataplane: FakeDataPlane, body: bytes, status: int, match: str
) -> None:
    response = await client.post("/v1/models/digits:predict", content=body)
    assert_error(response, status, match)
    assert dataplane.requests == []
    assert dataplane.rejected[-1][:2] == ("digits", Protocol.TFSERVING_REST)


async def test_wrong_feature_count_reaches_the_data_plane(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/digits:predict", json={"instances": [ROW[:3]]})
    assert_error(response, 400, r"pixels must be \[-1, 64\]")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (QueueFull("queue of digits v1 is full"), 429),
        (ModelNotReady("draining"), 503),
        (InferenceFailed("runtime blew up"), 500),
        (RuntimeError("a bug"), 500),
    ],
)
async def test_data_plane_errors_map_to_statuses(
    client: httpx.AsyncClient, dataplane: FakeDataPlane, error: Exception, status: int
) -> None:
    dataplane.fail_with = error
    for path, body in [
        ("/v1/models/digits:predict", {"instances": [ROW]}),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]},
        ),
    ]:
        response = await client.post(path, json=body, headers={"x-request-id": "r-9"})
        message = assert_error(response, status, ".")
        assert response.headers["x-request-id"] == "r-9"
        if isinstance(error, RuntimeError):
            assert message == "internal server error"  # no internals leak to the client


async def test_content_types(client: httpx.AsyncClient) -> None:
    body = json.dumps({"instances": [ROW]}).encode()
    for content_type in [None, "application/json; charset=utf-8", "application/x-www-form-urlencoded"]:
        headers = {"content-type": content_type} if content_type else {}
        response = await client.post("/v1/models/digits:predict", content=body, headers=headers)
        assert response.status_code == 200, (content_type, response.text)
    for content_type in ["text/html", "application/octet-stream", "multipart/form-data; boundary=x"]:
        response = await client.post(
            "/v1/models/digits:predict", content=body, headers={"content-type": content_type}
        )
        assert_error(response, 415, "unsupported content type")


async def test_body_limit(tmp_path: Path, dataplane: FakeDataPlane) -> None:
    async with await client_for(dataplane, make_settings(tmp_path, max_body_bytes=1000)) as small:
        big = json.dumps({"instances": [ROW] * 10}).encode()
        response = await small.post("/v1/models/digits:predict", content=big)
        assert_error(response, 413, "larger than the limit of 1000 bytes")
        assert dataplane.rejected[-1][2] is ErrorCode.PAYLOAD_TOO_LARGE

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 200

        response = await small.post("/v1/models/digits:predict", content=chunked())
        assert_error(response, 413, "larger than the limit")
        response = await small.post("/v2/models/digits/infer", content=big, headers={"x-request-id": "big-1"})
        assert_error(response, 413, "larger than the limit")
        assert response.headers["x-request-id"] == "big-1"
        bomb = gzip.compress(b" " * 100_000)
        response = await small.post(
            "/v1/models/digits:predict", content=bomb, headers={"content-encoding": "gzip"}
        )
        assert_error(response, 413, "decompressed request body is larger")


async def test_compressed_bodies(client: httpx.AsyncClient) -> None:
    body = gzip.compress(json.dumps({"instances": [ROW]}).encode())
    response = await client.post(
        "/v1/models/digits:predict", content=body, headers={"content-encoding": "gzip"}
    )
    assert response.status_code == 200
    response = await client.post(
        "/v1/models/digits:predict", content=b"xx", headers={"content-encoding": "gzip"}
    )
    assert_error(response, 400, "corrupt compressed")
    response = await client.post(
        "/v1/models/digits:predict", content=b"xx", headers={"content-encoding": "br"}
    )
    assert_error(response, 415, "Content-Encoding")


async def test_status_routes(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/digits")
    assert response.json() == {
        "model_version_status": [
            {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            for v in ("2", "1")
        ]
    }
    assert [
        s["version"]
        for s in (await client.get("/v1/models/digits/versions/1")).json()["model_version_status"]
    ] == ["1"]
    assert [
        s["version"]
        for s in (await client.get("/v1/models/digits/labels/stable")).json()["model_version_status"]
    ] == ["1"]
    assert_error(await client.get("/v1/models/nope"), 404, "not found")
    assert_error(await client.get("/v1/models/digits/versions/x"), 400, "non-negative integer")
    assert_error(await client.get("/v1/models/digits/labels/nope"), 404, "no version label")
    assert_error(await client.get("/v1/models"), 400, "Missing model name")


async def test_metadata_routes(client: httpx.AsyncClient) -> None:
    latest = (await client.get("/v1/models/digits/metadata")).json()
    assert latest["model_spec"] == {"name": "digits", "signature_name": "", "version": "2"}
    golden = json.loads((TESTDATA / "tfserving-metadata-response.json").read_text())
    assert (await client.get("/v1/models/digits/versions/1/metadata")).json() == golden
    assert (await client.get("/v1/models/digits/labels/stable/metadata")).json() == golden
    assert_error(await client.get("/v1/models/nope/metadata"), 404, "not found")


# -- OIP /v2 ----------------------------------------------------------------------------


async def test_v2_server_routes(client: httpx.AsyncClient, dataplane: FakeDataPlane) -> None:
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "modelloop" and "binary_tensor_data" in meta["extensions"]
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    dataplane.is_ready = False
    dataplane.is_live = False
    assert_error(await client.get("/v2/health/ready"), 503, "not ready")
    assert_error(await client.get("/v2/health/live"), 503, "not live")


async def test_v2_model_routes(client: httpx.AsyncClient, dataplane: FakeDataPlane) -> None:
    golden = json.loads((TESTDATA / "v2-model-metadata-response.json").read_text())
    meta = (await client.get("/v2/models/digits/versions/1")).json()
    assert meta == {**golden, "versions": ["1", "2"]}
    assert (await client.get("/v2/models/digits")).status_code == 200
    assert (await client.get("/v2/models/digits/ready")).json() == {"name": "digits", "ready": True}
    assert (await client.get("/v2/models/digits/versions/2/ready")).status_code == 200
    dataplane.unavailable.add(("digits", 2))
    assert_error(await client.get("/v2/models/digits/versions/2/ready"), 503, "version 2 is not ready")
    assert (await client.get("/v2/models/digits")).json()["versions"] == ["1"]
    assert_error(await client.get("/v2/models/nope/ready"), 404, "not found")
    assert_error(await client.get("/v2/models/nope"), 404, "not found")
    assert_error(await client.get("/v2/models/digits/versions/x"), 400, "non-negative integer")


async def test_v2_infer_golden(client: httpx.AsyncClient, dataplane: FakeDataPlane) -> None:
    body = (TESTDATA / "v2-infer-request.json").read_bytes()
    response = await client.post("/v2/models/digits/versions/1/infer", content=body)
    assert response.status_code == 200, response.text
    result = response.json()
    pixels = np.array(json.loads(body)["inputs"][0]["data"], np.float32).reshape(2, 64)
    assert result["id"] == "golden-1" and result["model_version"] == "1"
    assert result["outputs"][0]["shape"] == [2, 10]
    np.testing.assert_array_equal(np.array(result["outputs"][0]["data"]).reshape(2, 10), pixels[:, :10])
    # With no x-request-id, the body's id is the request id everywhere.
    assert response.headers["x-request-id"] == "golden-1" and dataplane.requests[-1].id == "golden-1"
    response = await client.post("/v2/models/digits/infer", content=body, headers={"x-request-id": "hdr"})
    assert response.headers["x-request-id"] == "hdr" and response.json()["id"] == "golden-1"
    assert dataplane.requests[-1].protocol is Protocol.V2_REST


async def test_v2_infer_binary_extension(client: httpx.AsyncClient) -> None:
    pixels = np.arange(128, dtype=np.float32).reshape(2, 64)
    strings = [b"a", b"\xffz"]
    packed = b"".join(struct.pack("<I", len(s)) + s for s in strings)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 512},
                },
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    response = await client.post(
        "/v2/models/digits/infer",
        content=header + pixels.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "content-type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    result = json.loads(response.content[:length])
    out = result["outputs"][0]
    assert out["parameters"] == {"binary_data_size": 80} and "data" not in out
    np.testing.assert_array_equal(
        np.frombuffer(response.content[length:], np.float32).reshape(out["shape"]), pixels[:, :10]
    )
    # Multi: one binary BYTES input, JSON float input, one binary output and one JSON output.
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {
                    "name": "s",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(packed)},
                },
            ],
            "outputs": [{"name": "echo", "parameters": {"binary_data": True}}, {"name": "y"}],
        }
    ).encode()
    response = await client.post(
        "/v2/models/multi/infer",
        content=header + packed,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    outputs = {o["name"]: o for o in json.loads(response.content[:length])["outputs"]}
    assert outputs["y"]["data"] == [3.0, 7.0]
    assert outputs["echo"]["parameters"]["binary_data_size"] == len(packed)
    assert response.content[length:] == packed


@pytest.mark.parametrize(
    ("document", "headers", "status", "match"),
    [
        (b"{", {}, 400, "malformed JSON"),
        (
            {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP99", "data": ROW}]},
            {},
            400,
            "FP99",
        ),
        (
            {"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": ROW}]},
            {},
            400,
            "needs 128 elements",
        ),
        (
            {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]},
            {"Inference-Header-Content-Length": "x"},
            400,
            "Inference-Header-Content-Length",
        ),
        (
            {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]},
            {"Inference-Header-Content-Length": "99999"},
            400,
            "only",
        ),
        (
            {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]},
            {"content-type": "text/csv"},
            415,
            "unsupported content type",
        ),
        (
            {"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]},
            {},
            400,
            "do not match",
        ),
        (
            {
                "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}],
                "outputs": [{"name": "nope"}],
            },
            {},
            400,
            "unknown output 'nope'",
        ),
    ],
)
async def test_v2_bad_infer(
    client: httpx.AsyncClient, document: object, headers: dict[str, str], status: int, match: str
) -> None:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    response = await client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert_error(response, status, match)
    assert "x-request-id" in response.headers


async def test_v2_infer_unknown_model_and_version(client: httpx.AsyncClient) -> None:
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
    assert_error(await client.post("/v2/models/nope/infer", json=body), 404, "not found")
    assert_error(await client.post("/v2/models/digits/versions/7/infer", json=body), 404, "no version 7")
    assert_error(await client.post("/v2/models/digits/versions/v1/infer", json=body), 400, "integer")


# -- repository extension -----------------------------------------------------------------


async def test_repository_routes_need_a_token(client: httpx.AsyncClient, dataplane: FakeDataPlane) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in [
        "/v2/repository/index",
        "/v2/repository/models/digits/load",
        "/v2/repository/models/digits/unload",
    ]:
        response = await client.post(path)
        assert_error(response, 401, "bearer token")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(await client.post(path, headers={"Authorization": "Bearer wrong"}), 401, "bearer token")
        assert_error(
            await client.post(path, headers={"Authorization": f"Basic {TOKEN}"}), 401, "bearer token"
        )
    index = await client.post("/v2/repository/index", headers=auth)
    assert index.status_code == 200 and {e["name"] for e in index.json()} == {"digits", "multi"}
    ready = await client.post("/v2/repository/index", headers=auth, json={"ready": True})
    assert len(ready.json()) == 3
    assert_error(await client.post("/v2/repository/index", headers=auth, json={"ready": 1}), 400, "boolean")
    assert (await client.post("/v2/repository/models/digits/load", headers=auth)).status_code == 200
    assert (await client.post("/v2/repository/models/digits/unload", headers=auth)).status_code == 200
    assert dataplane.loaded == ["digits"] and dataplane.unloaded == ["digits"]
    assert_error(
        await client.post("/v2/repository/models/nope/load", headers=auth), 404, "not in the repository"
    )


async def test_repository_routes_off_without_token(tmp_path: Path, dataplane: FakeDataPlane) -> None:
    async with await client_for(dataplane, make_settings(tmp_path)) as c:
        for path in ["/v2/repository/index", "/v2/repository/models/digits/load"]:
            response = await c.post(path, headers={"Authorization": "Bearer anything"})
            assert_error(response, 403, "admin routes are disabled: set MODELLOOP_ADMIN_TOKEN")
    async with await client_for(dataplane, make_settings(tmp_path, admin_token=SecretStr(""))) as c:
        assert_error(
            await c.post("/v2/repository/index", headers={"Authorization": "Bearer "}), 403, "disabled"
        )


# -- the rest ----------------------------------------------------------------------------


async def test_metrics_docs_and_status_page(client: httpx.AsyncClient) -> None:
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    assert "modelloop_probe_total 1.0" in metrics.text
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/v2/models/{model}/infer" in paths and "/v1/models/{model_method}" in paths
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for text in ["digits", "multi", "AVAILABLE", 'href="/docs"', 'href="/metrics"', "ready"]:
        assert text in page.text


async def test_framework_errors_use_the_error_body(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/no/such/route"), 404, "no route for GET /no/such/route")
    response = await client.get("/v2/models/digits/infer")
    assert_error(response, 405, "method GET is not allowed")
    assert_error(await client.delete("/v1/models/digits"), 405, "not allowed")


async def test_cors(tmp_path: Path, dataplane: FakeDataPlane) -> None:
    settings = make_settings(tmp_path, cors_origins=["https://app.example"])
    async with await client_for(dataplane, settings) as c:
        preflight = await c.options(
            "/v1/models/digits:predict",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = await c.post(
            "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"Origin": "https://app.example"}
        )
        assert "x-request-id" in response.headers["access-control-expose-headers"]
    async with await client_for(dataplane, make_settings(tmp_path)) as c:
        response = await c.get("/v2", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
