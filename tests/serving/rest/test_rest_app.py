"""The REST app over the real DataPlane with fake runtimes: routing, translation, headers, errors.

The stack is the production one (repository, registry, data plane; see
``tests/serving/edge_support.py``); only the runtimes are fakes, so what a test sees is
what a client of the real server sees, and what a request did is read back from the
fake runtimes' records and the Prometheus registry.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import Counter
from pydantic import SecretStr

from modelloop.serving.rest.app import create_app

from ..edge_support import (
    EdgeStack,
    GatedRuntime,
    RuntimeFactory,
    UnencodableRuntime,
    failing,
    serve,
    write_digits,
    write_multi,
)
from ..fakes import FailingLoadRuntime

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = [float(i % 17) for i in range(64)]
V2_ROW = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
FRESH_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """``digits`` versions 1 and 2 (label ``stable`` -> 1) and ``multi`` version 1."""
    repo = tmp_path / "models"
    write_digits(repo, (1, 2))
    write_multi(repo)
    return repo


@pytest.fixture
async def stack(repo: Path) -> AsyncIterator[EdgeStack]:
    async with serve(repo, admin_token=TOKEN) as stack:
        yield stack


def client_for(
    stack: EdgeStack, *, raise_app_exceptions: bool = True, **settings: object
) -> httpx.AsyncClient:
    """A client of the app over ``stack``; ``settings`` change the app's settings only."""
    app = create_app(stack.dataplane, stack.settings.model_copy(update=settings), stack.prometheus)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
async def client(stack: EdgeStack) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(stack) as c:
        yield c


def assert_error(response: httpx.Response, status: int, match: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    assert re.search(match, body["error"]), body["error"]
    return body["error"]


def calls(stack: EdgeStack, model: str, version: int) -> list[dict[str, np.ndarray]]:
    """The inputs every predict of that version's fake runtime received."""
    return stack.factory.runtime(model, version).calls


def no_inference(stack: EdgeStack) -> bool:
    return all(not getattr(runtime, "calls", []) for runtime in stack.factory.built)


# -- TF Serving /v1 ---------------------------------------------------------------------


async def test_predict_golden_row_format(client: httpx.AsyncClient, stack: EdgeStack) -> None:
    body = (TESTDATA / "tfserving-predict-request.json").read_bytes()
    response = await client.post("/v1/models/digits:predict", content=body)
    assert response.status_code == 200, response.text
    assert FRESH_ID.fullmatch(response.headers["x-request-id"])
    rows = json.loads(body)["instances"]
    assert response.json() == {"predictions": [row[:10] for row in rows]}
    # No version in the path: the latest (2) answered, with the rows as sent.
    assert calls(stack, "digits", 1) == []
    (sent,) = calls(stack, "digits", 2)
    np.testing.assert_array_equal(sent["pixels"], np.array(rows, np.float32))
    assert stack.requests() == {("digits", "2", "tfserving_rest", "OK"): 1}


async def test_predict_columnar_format(client: httpx.AsyncClient) -> None:
    body = (TESTDATA / "tfserving-predict-columnar-request.json").read_bytes()
    response = await client.post("/v1/models/digits:predict", content=body)
    assert response.status_code == 200
    rows = json.loads(body)["inputs"]["pixels"]
    assert response.json() == {"outputs": [row[:10] for row in rows]}


async def test_predict_multi_output_rows_and_b64(client: httpx.AsyncClient, stack: EdgeStack) -> None:
    body = {"instances": [{"a": [1, 2], "s": {"b64": "aGk="}}, {"a": [3, 4], "s": "yo"}]}
    response = await client.post("/v1/models/multi:predict", json=body)
    assert response.json() == {"predictions": [{"y": 3.0, "echo": "hi"}, {"y": 7.0, "echo": "yo"}]}
    (sent,) = calls(stack, "multi", 1)
    assert sent["a"].dtype == np.float32 and sent["s"].tolist()[0] == b"hi"


async def test_predict_version_and_label_paths(client: httpx.AsyncClient, stack: EdgeStack) -> None:
    ok = await client.post("/v1/models/digits/versions/2:predict", json={"instances": [ROW]})
    assert ok.status_code == 200 and (len(calls(stack, "digits", 1)), len(calls(stack, "digits", 2))) == (
        0,
        1,
    )
    ok = await client.post("/v1/models/digits/labels/stable:predict", json={"instances": [ROW]})
    assert ok.status_code == 200 and (len(calls(stack, "digits", 1)), len(calls(stack, "digits", 2))) == (
        1,
        1,
    )
    ok = await client.post("/v1/models/digits/versions/1:predict", json={"instances": [ROW]})
    assert ok.status_code == 200 and len(calls(stack, "digits", 1)) == 2
    # TF Serving matches paths case-insensitively; the method at least.
    ok = await client.post("/v1/models/digits:PREDICT", json={"instances": [ROW]})
    assert ok.status_code == 200 and len(calls(stack, "digits", 2)) == 2
    assert stack.count("digits", "1", "tfserving_rest", "OK") == 2
    assert stack.count("digits", "2", "tfserving_rest", "OK") == 2


async def test_request_id_kept_or_replaced(client: httpx.AsyncClient) -> None:
    kept = await client.post(
        "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"x-request-id": "client-42"}
    )
    assert kept.status_code == 200 and kept.headers["x-request-id"] == "client-42"
    for bad in ["x" * 129, "x" * 200, "tab\there"]:
        replaced = await client.post(
            "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"x-request-id": bad}
        )
        assert replaced.status_code == 200 and FRESH_ID.fullmatch(replaced.headers["x-request-id"])
    assert (
        await client.post(
            "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"x-request-id": "x" * 128}
        )
    ).headers["x-request-id"] == "x" * 128
    error = await client.post("/v1/models/digits:predict", content=b"{", headers={"x-request-id": "e-1"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "e-1"


@pytest.mark.parametrize("method", ["classify", "regress"])
async def test_classify_and_regress_are_501(client: httpx.AsyncClient, stack: EdgeStack, method: str) -> None:
    response = await client.post(f"/v1/models/digits:{method}", json={"examples": [{"x": 1}]})
    assert_error(response, 501, f":{method} is not implemented")
    assert FRESH_ID.fullmatch(response.headers["x-request-id"])
    # Refused before the version resolved: counted once, with no model or version label.
    assert stack.requests() == {("", "", "tfserving_rest", "UNIMPLEMENTED"): 1}


@pytest.mark.parametrize(
    ("path", "status", "match", "model"),
    [
        ("/v1/models/digits:explain", 404, "Malformed request", ""),
        ("/v1/models/digits", 404, "Malformed request", ""),
        ("/v1/models/:predict", 404, "Malformed request", ""),
        ("/v1/models/digits/versions/abc:predict", 400, 'non-negative integer, got "abc"', "digits"),
        ("/v1/models/digits/versions/-1:predict", 400, "non-negative integer", "digits"),
        ("/v1/models/digits/versions/9:predict", 404, "no loaded version 9", "digits"),
        ("/v1/models/digits/labels/canary:predict", 404, "no version label 'canary'", "digits"),
        ("/v1/models/nope:predict", 404, "model 'nope' not found", ""),
    ],
)
async def test_bad_predict_paths(
    client: httpx.AsyncClient, stack: EdgeStack, path: str, status: int, match: str, model: str
) -> None:
    response = await client.post(path, json={"instances": [ROW]})
    message = assert_error(response, status, match)
    assert FRESH_ID.fullmatch(response.headers["x-request-id"])
    code = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}[status]
    # Unknown names never become label values; no version resolved, so none is recorded.
    assert stack.requests() == {(model, "", "tfserving_rest", code): 1}, message
    assert no_inference(stack)


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
    client: httpx.AsyncClient, stack: EdgeStack, body: bytes, status: int, match: str
) -> None:
    response = await client.post("/v1/models/digits:predict", content=body)
    assert_error(response, status, match)
    assert no_inference(stack)
    # The version resolved before the body failed to decode: counted once, with it.
    code = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}[status]
    assert stack.requests() == {("digits", "2", "tfserving_rest", code): 1}


async def test_wrong_feature_count_is_refused_by_the_data_plane(
    client: httpx.AsyncClient, stack: EdgeStack
) -> None:
    response = await client.post("/v1/models/digits:predict", json={"instances": [ROW[:3]]})
    assert_error(
        response, 400, r"input 'pixels' has 3 features \(shape \[1, 3\]\); model 'digits' expects 64"
    )
    assert no_inference(stack)


async def test_a_full_queue_is_429(repo: Path) -> None:
    factory = RuntimeFactory({("digits", 2): GatedRuntime})
    batching = {"max_batch_size": 1, "max_enqueued_batches": 1, "batch_timeout_micros": 0}
    async with serve(repo, factory, batching=batching) as stack, client_for(stack) as client:
        gate = stack.factory.runtime("digits", 2)
        batcher = stack.dataplane.registry.resolve("digits").batcher
        running = asyncio.create_task(client.post("/v1/models/digits:predict", json={"instances": [ROW]}))
        try:
            await asyncio.to_thread(gate.started.wait, 10)
            waiting = asyncio.create_task(client.post("/v2/models/digits/infer", json=V2_ROW))
            async with asyncio.timeout(10):
                while batcher.queued_rows < 1:
                    await asyncio.sleep(0)
            for path, body in [
                ("/v1/models/digits:predict", {"instances": [ROW]}),
                ("/v2/models/digits/infer", V2_ROW),
            ]:
                response = await client.post(path, json=body, headers={"x-request-id": "r-9"})
                assert_error(response, 429, "queue of model 'digits' version 2 is full")
                assert response.headers["x-request-id"] == "r-9"
        finally:
            gate.release.set()
        assert (await running).status_code == 200 and (await waiting).status_code == 200
        assert stack.count("digits", "2", "tfserving_rest", "RESOURCE_EXHAUSTED") == 1
        assert stack.count("digits", "2", "v2_rest", "RESOURCE_EXHAUSTED") == 1


@pytest.mark.parametrize(
    ("overrides", "status", "match"),
    [
        ({("digits", 2): FailingLoadRuntime}, 503, "version 2 is FAILED: ValueError: corrupt model file"),
        (
            {("digits", 2): failing(RuntimeError("boom: the model exploded"))},
            500,
            "failed on a batch of 1 rows",
        ),
    ],
    ids=["not ready", "inference failed"],
)
async def test_data_plane_errors_map_to_statuses(
    repo: Path, overrides: dict, status: int, match: str
) -> None:
    async with serve(repo, RuntimeFactory(overrides)) as stack, client_for(stack) as client:
        for path, body in [
            ("/v1/models/digits/versions/2:predict", {"instances": [ROW]}),
            ("/v2/models/digits/versions/2/infer", V2_ROW),
        ]:
            response = await client.post(path, json=body, headers={"x-request-id": "r-9"})
            assert_error(response, status, match)
            assert response.headers["x-request-id"] == "r-9"


async def test_a_stopped_data_plane_is_503(stack: EdgeStack, client: httpx.AsyncClient) -> None:
    await stack.dataplane.stop()
    for path, body in [
        ("/v1/models/digits:predict", {"instances": [ROW]}),
        ("/v2/models/digits/infer", V2_ROW),
    ]:
        response = await client.post(path, json=body, headers={"x-request-id": "late-1"})
        assert_error(response, 503, "shutting down")
        assert response.headers["x-request-id"] == "late-1"
    assert stack.requests() == {
        ("", "", "tfserving_rest", "UNAVAILABLE"): 1,
        ("", "", "v2_rest", "UNAVAILABLE"): 1,
    }


async def test_a_bug_past_the_data_plane_is_500_without_internals(repo: Path) -> None:
    factory = RuntimeFactory({("multi", 1): UnencodableRuntime})
    async with serve(repo, factory) as stack, client_for(stack, raise_app_exceptions=False) as client:
        body = {"instances": [{"a": [1, 2], "s": "x"}]}
        response = await client.post("/v1/models/multi:predict", json=body)
        message = assert_error(response, 500, ".")
        assert message == "internal server error"  # no internals leak to the client
        # The server keeps serving.
        assert (await client.post("/v1/models/digits:predict", json={"instances": [ROW]})).status_code == 200


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


async def test_body_limit(stack: EdgeStack) -> None:
    async with client_for(stack, max_body_bytes=1000) as small:
        big = json.dumps({"instances": [ROW] * 10}).encode()
        response = await small.post("/v1/models/digits:predict", content=big)
        assert_error(response, 413, "larger than the limit of 1000 bytes")
        # The body is refused while it is received, before a version resolves.
        assert stack.requests() == {("digits", "", "tfserving_rest", "PAYLOAD_TOO_LARGE"): 1}

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
        assert stack.count("digits", "", "tfserving_rest", "PAYLOAD_TOO_LARGE") == 3
        assert stack.count("digits", "", "v2_rest", "PAYLOAD_TOO_LARGE") == 1
        assert no_inference(stack)


async def test_compressed_bodies(client: httpx.AsyncClient) -> None:
    body = gzip.compress(json.dumps({"instances": [ROW]}).encode())
    response = await client.post(
        "/v1/models/digits:predict", content=body, headers={"content-encoding": "gzip"}
    )
    assert response.status_code == 200 and response.json() == {"predictions": [ROW[:10]]}
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
            for v in ("1", "2")
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
    assert_error(await client.get("/v1/models/digits/versions/7"), 404, "no version 7")
    assert_error(await client.get("/v1/models/digits/labels/nope"), 404, "no version label")
    assert_error(await client.get("/v1/models"), 400, "Missing model name")


async def test_status_of_a_version_that_failed_to_load(repo: Path) -> None:
    async with (
        serve(repo, RuntimeFactory({("digits", 2): FailingLoadRuntime})) as stack,
        client_for(stack) as c,
    ):
        statuses = (await c.get("/v1/models/digits")).json()["model_version_status"]
        assert statuses[1] == {
            "version": "2",
            "state": "END",
            "status": {"error_code": "UNKNOWN", "error_message": "ValueError: corrupt model file"},
        }


async def test_metadata_routes(client: httpx.AsyncClient) -> None:
    latest = (await client.get("/v1/models/digits/metadata")).json()
    assert latest["model_spec"] == {"name": "digits", "signature_name": "", "version": "2"}
    golden = json.loads((TESTDATA / "tfserving-metadata-response.json").read_text())
    assert (await client.get("/v1/models/digits/versions/1/metadata")).json() == golden
    assert (await client.get("/v1/models/digits/labels/stable/metadata")).json() == golden
    assert_error(await client.get("/v1/models/nope/metadata"), 404, "not found")


# -- OIP /v2 ----------------------------------------------------------------------------


async def test_v2_server_routes(client: httpx.AsyncClient, stack: EdgeStack) -> None:
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "modelloop" and meta["extensions"] == [
        "binary_tensor_data",
        "model_configuration",
        "statistics",
        "model_repository",
        "system_shared_memory",
    ]
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    await stack.dataplane.drain(grace_s=1)
    assert_error(await client.get("/v2/health/ready"), 503, "not ready")
    assert (await client.get("/v2/health/live")).status_code == 200  # draining is still live
    await stack.dataplane.stop()
    assert_error(await client.get("/v2/health/live"), 503, "not live")


async def test_v2_statistics(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v2/models/digits/versions/1/infer", json=V2_ROW)).status_code == 200
    two_rows = {"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": ROW * 2}]}
    assert (await client.post("/v2/models/digits/infer", json=two_rows)).status_code == 200
    bad = {"inputs": [{"name": "pixels", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert (await client.post("/v2/models/digits/infer", json=bad)).status_code == 400

    every = (await client.get("/v2/models/stats")).json()["model_stats"]
    assert [(s["name"], s["version"]) for s in every] == [("digits", "1"), ("digits", "2"), ("multi", "1")]
    latest = (await client.get("/v2/models/digits/versions/2/stats")).json()["model_stats"]
    [two] = latest
    assert (two["inference_count"], two["execution_count"]) == (2, 1)
    stats = two["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (1, 1)
    assert stats["compute_infer"]["count"] == 1 and stats["compute_infer"]["ns"] > 0
    assert two["batch_stats"][0]["batch_size"] == 2 and two["last_inference"] > 0
    by_model = (await client.get("/v2/models/digits/stats")).json()["model_stats"]
    assert [s["version"] for s in by_model] == ["1", "2"]
    assert by_model[0]["inference_count"] == 1

    assert_error(await client.get("/v2/models/nope/stats"), 404, "'nope'")
    assert_error(await client.get("/v2/models/digits/versions/9/stats"), 404, "no version 9")
    assert_error(await client.get("/v2/models/digits/versions/x/stats"), 400, "non-negative integer")


async def test_v2_not_ready_before_start(repo: Path) -> None:
    async with serve(repo, start=False) as stack, client_for(stack) as client:
        assert_error(await client.get("/v2/health/ready"), 503, "not ready")
        assert (await client.get("/v2/health/live")).status_code == 200
        await stack.dataplane.start()
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}


async def test_v2_model_routes(client: httpx.AsyncClient) -> None:
    golden = json.loads((TESTDATA / "v2-model-metadata-response.json").read_text())
    meta = (await client.get("/v2/models/digits/versions/1")).json()
    assert meta == {**golden, "versions": ["1", "2"]}
    assert (await client.get("/v2/models/digits")).status_code == 200
    assert (await client.get("/v2/models/digits/ready")).json() == {"name": "digits", "ready": True}
    assert (await client.get("/v2/models/digits/versions/2/ready")).status_code == 200
    assert_error(await client.get("/v2/models/nope/ready"), 404, "not found")
    assert_error(await client.get("/v2/models/nope"), 404, "not found")
    assert_error(await client.get("/v2/models/digits/versions/x"), 400, "non-negative integer")
    assert_error(await client.get("/v2/models/digits/versions/7/ready"), 404, "no loaded version 7")


async def test_v2_model_config_reports_how_the_version_is_served(client: httpx.AsyncClient) -> None:
    config = (await client.get("/v2/models/digits/versions/1/config")).json()
    assert (config["name"], config["max_batch_size"], config["backend"]) == ("digits", 0, "onnxruntime")
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [-1, 64]}]
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert parameters["dynamic_batching"] == "true" and parameters["max_batch_size"] == "32"
    assert (await client.get("/v2/models/digits/config")).status_code == 200
    assert_error(await client.get("/v2/models/nope/config"), 404, "not found")
    assert_error(await client.get("/v2/models/digits/versions/x/config"), 400, "non-negative integer")


async def test_v2_model_routes_with_a_version_that_failed_to_load(repo: Path) -> None:
    async with (
        serve(repo, RuntimeFactory({("digits", 2): FailingLoadRuntime})) as stack,
        client_for(stack) as c,
    ):
        assert_error(
            await c.get("/v2/models/digits/versions/2/ready"), 503, 'model "digits" version 2 is not ready'
        )
        assert (await c.get("/v2/models/digits/ready")).status_code == 200  # version 1 serves
        assert (await c.get("/v2/models/digits")).json()["versions"] == ["1"]
        assert_error(await c.get("/v2/models/digits/versions/2"), 503, "version 2 is FAILED")


async def test_v2_infer_golden(client: httpx.AsyncClient, stack: EdgeStack) -> None:
    body = (TESTDATA / "v2-infer-request.json").read_bytes()
    response = await client.post("/v2/models/digits/versions/1/infer", content=body)
    assert response.status_code == 200, response.text
    result = response.json()
    pixels = np.array(json.loads(body)["inputs"][0]["data"], np.float32).reshape(2, 64)
    assert result["id"] == "golden-1" and result["model_version"] == "1"
    assert result["outputs"][0]["shape"] == [2, 10]
    np.testing.assert_array_equal(np.array(result["outputs"][0]["data"]).reshape(2, 10), pixels[:, :10])
    # With no x-request-id, the body's id is the request id everywhere.
    assert response.headers["x-request-id"] == "golden-1"
    np.testing.assert_array_equal(calls(stack, "digits", 1)[0]["pixels"], pixels)
    response = await client.post("/v2/models/digits/infer", content=body, headers={"x-request-id": "hdr"})
    assert response.headers["x-request-id"] == "hdr" and response.json()["id"] == "golden-1"
    assert response.json()["model_version"] == "2"
    assert stack.requests() == {("digits", "1", "v2_rest", "OK"): 1, ("digits", "2", "v2_rest", "OK"): 1}


async def test_v2_request_ids(client: httpx.AsyncClient) -> None:
    for bad in ["x" * 200, "tab\there"]:
        response = await client.post("/v2/models/digits/infer", json=V2_ROW, headers={"x-request-id": bad})
        assert response.status_code == 200 and FRESH_ID.fullmatch(response.headers["x-request-id"])
        assert FRESH_ID.fullmatch(response.json()["id"])
        # An invalid id in the body is no better than one in the header.
        response = await client.post("/v2/models/digits/infer", json={**V2_ROW, "id": bad})
        assert response.status_code == 200 and FRESH_ID.fullmatch(response.headers["x-request-id"])
    response = await client.post(
        "/v2/models/digits/infer", json={**V2_ROW, "id": "body-1"}, headers={"x-request-id": "x" * 200}
    )
    assert response.headers["x-request-id"] == "body-1"
    error = await client.post("/v2/models/digits/infer", content=b"{", headers={"x-request-id": "e-2"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "e-2"
    error = await client.post("/v2/models/digits/infer", content=b"{", headers={"x-request-id": "tab\tx"})
    assert error.status_code == 400 and FRESH_ID.fullmatch(error.headers["x-request-id"])


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
            "unknown input 'nope' for model 'digits'; its inputs are 'pixels'",
        ),
        (
            {"inputs": [{"name": "pixels", "shape": [1, 8], "datatype": "FP32", "data": ROW[:8]}]},
            {},
            400,
            r"has 8 features .*expects 64",
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
    client: httpx.AsyncClient,
    stack: EdgeStack,
    document: object,
    headers: dict[str, str],
    status: int,
    match: str,
) -> None:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    response = await client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert_error(response, status, match)
    assert FRESH_ID.fullmatch(response.headers["x-request-id"])
    code = {400: "INVALID_ARGUMENT", 415: "UNSUPPORTED_MEDIA_TYPE"}[status]
    # The headers are checked while the body is received, before a version resolves; the
    # body is decoded against the resolved version.
    version = "" if status == 415 or headers.get("Inference-Header-Content-Length") == "x" else "2"
    assert stack.requests() == {("digits", version, "v2_rest", code): 1}
    assert no_inference(stack)


async def test_v2_infer_unknown_model_and_version(client: httpx.AsyncClient, stack: EdgeStack) -> None:
    assert_error(await client.post("/v2/models/nope/infer", json=V2_ROW), 404, "model 'nope' not found")
    assert_error(
        await client.post("/v2/models/digits/versions/7/infer", json=V2_ROW), 404, "no loaded version 7"
    )
    assert_error(await client.post("/v2/models/digits/versions/v1/infer", json=V2_ROW), 400, "integer")
    assert stack.requests() == {
        ("", "", "v2_rest", "NOT_FOUND"): 1,
        ("digits", "", "v2_rest", "NOT_FOUND"): 1,
        ("digits", "", "v2_rest", "INVALID_ARGUMENT"): 1,
    }


# -- what every REST route shares --------------------------------------------------------


@pytest.mark.parametrize("version", ["²", "-1", "1e3", "+1", " 1"])
async def test_a_version_that_is_not_ascii_digits_is_400_everywhere(
    client: httpx.AsyncClient, stack: EdgeStack, version: str
) -> None:
    message = f'model version must be a non-negative integer, got "{version}"'
    for method, path, body in [
        ("POST", f"/v1/models/digits/versions/{version}:predict", {"instances": [ROW]}),
        ("POST", f"/v2/models/digits/versions/{version}/infer", V2_ROW),
        ("GET", f"/v1/models/digits/versions/{version}", None),
        ("GET", f"/v1/models/digits/versions/{version}/metadata", None),
        ("GET", f"/v2/models/digits/versions/{version}", None),
        ("GET", f"/v2/models/digits/versions/{version}/ready", None),
    ]:
        response = await client.request(method, path, json=body)
        assert assert_error(response, 400, ".") == message, path
    assert stack.requests() == {
        ("digits", "", "tfserving_rest", "INVALID_ARGUMENT"): 1,
        ("digits", "", "v2_rest", "INVALID_ARGUMENT"): 1,
    }
    assert no_inference(stack)


async def test_a_client_id_comes_back_on_every_error(client: httpx.AsyncClient) -> None:
    for path, body in [
        ("/v1/models/nope:predict", {"instances": [ROW]}),
        ("/v1/models/digits/versions/²:predict", {"instances": [ROW]}),
        ("/v1/models/digits:classify", {"instances": [ROW]}),
        ("/v1/models/digits:predict", {"instances": [ROW[:3]]}),
        ("/v2/models/nope/infer", V2_ROW),
        ("/v2/models/digits/versions/²/infer", V2_ROW),
        ("/v2/models/digits/infer", {"inputs": []}),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "pixels", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
        ),
    ]:
        response = await client.post(path, json=body, headers={"x-request-id": "mine-7"})
        assert response.status_code >= 400 and response.headers["x-request-id"] == "mine-7", path


# -- repository extension -----------------------------------------------------------------


async def test_repository_routes_need_a_token(client: httpx.AsyncClient, stack: EdgeStack) -> None:
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
    assert (await client.get("/v2/models/digits/ready")).status_code == 200  # nothing was unloaded
    index = await client.post("/v2/repository/index", headers=AUTH)
    assert index.status_code == 200 and {e["name"] for e in index.json()} == {"digits", "multi"}
    ready = await client.post("/v2/repository/index", headers=AUTH, json={"ready": True})
    assert [(e["name"], e["version"]) for e in ready.json()] == [
        ("digits", "1"),
        ("digits", "2"),
        ("multi", "1"),
    ]
    assert_error(await client.post("/v2/repository/index", headers=AUTH, json={"ready": 1}), 400, "boolean")

    first = stack.factory.runtime("digits", 2)
    assert (await client.post("/v2/repository/models/digits/unload", headers=AUTH)).status_code == 200
    assert first.unloaded
    assert_error(await client.get("/v2/models/digits/ready"), 503, "not ready")
    assert_error(
        await client.post("/v2/models/digits/infer", json=V2_ROW), 503, "unloaded through the repository"
    )
    assert (await client.get("/v2/health/ready")).status_code == 200  # unloaded models do not count
    assert (await client.post("/v2/repository/models/digits/load", headers=AUTH)).status_code == 200
    assert stack.factory.runtime("digits", 2) is not first
    assert (await client.get("/v2/models/digits/ready")).status_code == 200
    assert (await client.post("/v2/models/digits/infer", json=V2_ROW)).status_code == 200
    assert_error(
        await client.post("/v2/repository/models/nope/load", headers=AUTH), 404, "not in the repository"
    )


async def test_repository_load_of_a_model_that_cannot_load_is_503(repo: Path) -> None:
    factory = RuntimeFactory({("digits", 1): FailingLoadRuntime, ("digits", 2): FailingLoadRuntime})
    async with serve(repo, factory, admin_token=TOKEN) as stack, client_for(stack) as client:
        response = await client.post("/v2/repository/models/digits/load", headers=AUTH)
        assert_error(
            response, 503, "has no version that loaded: version 1 FAILED: ValueError: corrupt model file"
        )


async def test_repository_routes_off_without_token(stack: EdgeStack) -> None:
    async with client_for(stack, admin_token=None) as c:
        for path in ["/v2/repository/index", "/v2/repository/models/digits/load"]:
            response = await c.post(path, headers={"Authorization": "Bearer anything"})
            assert_error(response, 403, "admin routes are disabled: set MODELLOOP_ADMIN_TOKEN")
    async with client_for(stack, admin_token=SecretStr("")) as c:
        assert_error(
            await c.post("/v2/repository/index", headers={"Authorization": "Bearer "}), 403, "disabled"
        )


# -- the rest ----------------------------------------------------------------------------


async def test_metrics_docs_and_status_page(client: httpx.AsyncClient, stack: EdgeStack) -> None:
    Counter("modelloop_probe", "A metric to find in /metrics.", registry=stack.prometheus).inc()
    assert (await client.post("/v1/models/digits:predict", json={"instances": [ROW]})).status_code == 200
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    assert "modelloop_probe_total 1.0" in metrics.text
    assert (
        'modelloop_requests_total{code="OK",model="digits",protocol="tfserving_rest",version="2"} 1.0'
        in metrics.text
    )
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/v2/models/{model}/infer" in paths and "/v1/models/{model_method}" in paths
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for text in ["digits", "multi", "AVAILABLE", 'href="/docs"', 'href="/metrics"', "<strong>ready</strong>"]:
        assert text in page.text


async def test_framework_errors_use_the_error_body(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/no/such/route"), 404, "no route for GET /no/such/route")
    response = await client.get("/v2/models/digits/infer")
    assert_error(response, 405, "method GET is not allowed")
    assert_error(await client.delete("/v1/models/digits"), 405, "not allowed")


async def test_cors(stack: EdgeStack) -> None:
    async with client_for(stack, cors_origins=["https://app.example"]) as c:
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
    async with client_for(stack) as c:
        response = await c.get("/v2", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
