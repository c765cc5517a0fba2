"""The REST app over the real DataPlane and the published ``digits`` model (ONNX Runtime).

The edge tests with fake runtimes are in ``test_rest_app.py``; these keep one real model
on the wire, so that what ONNX Runtime answers is what a client reads.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelloop.serving.rest.app import create_app

from ..edge_support import serve

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
ROWS = json.loads((TESTDATA / "tfserving-predict-request.json").read_text())["instances"]
ROW = ROWS[0]


def v2_body(
    data: object, shape: list[int], datatype: str = "FP32", name: str = "pixels"
) -> dict[str, object]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


@pytest.fixture
async def served(digits_repo: Path) -> AsyncIterator[tuple[httpx.AsyncClient, CollectorRegistry]]:
    async with serve(digits_repo, real_runtimes=True, max_body_bytes=256 * 1024) as stack:
        app = create_app(stack.dataplane, stack.settings, stack.prometheus)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client, stack.prometheus


@pytest.fixture
def client(served: tuple[httpx.AsyncClient, CollectorRegistry]) -> httpx.AsyncClient:
    return served[0]


def assert_error(response: httpx.Response, status: int, match: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and re.search(match, body["error"]), body


async def test_predict_formats_and_infer_agree(client: httpx.AsyncClient) -> None:
    rows = (await client.post("/v1/models/digits:predict", json={"instances": ROWS})).json()["predictions"]
    cols = (
        await client.post("/v1/models/digits/versions/1:predict", json={"inputs": {"pixels": ROWS}})
    ).json()["outputs"]
    flat = [v for row in ROWS for v in row]
    v2 = (await client.post("/v2/models/digits/infer", json=v2_body(flat, [2, 64]))).json()
    probs = np.array(rows, np.float32)
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.array(cols), probs, rtol=1e-6)
    np.testing.assert_allclose(np.array(v2["outputs"][0]["data"]).reshape(2, 10), probs, rtol=1e-6)
    assert v2["model_name"] == "digits" and v2["model_version"] == "1"
    # The digits data's first two rows are a 0 and a 1; a trained model gets them right.
    assert probs.argmax(axis=1).tolist() == [0, 1]


async def test_binary_extension(client: httpx.AsyncClient) -> None:
    pixels = np.array(ROWS, np.float32)
    header = json.dumps(
        {
            "id": "bin-1",
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 512},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
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
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    assert meta["id"] == "bin-1" and response.headers["x-request-id"] == "bin-1"
    probs = np.frombuffer(response.content[length:], np.float32).reshape(meta["outputs"][0]["shape"])
    assert probs.argmax(axis=1).tolist() == [0, 1]


async def test_request_ids_and_metrics(served: tuple[httpx.AsyncClient, CollectorRegistry]) -> None:
    client, prometheus = served
    response = await client.post(
        "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"x-request-id": "feedback-7"}
    )
    assert response.headers["x-request-id"] == "feedback-7"
    bad = await client.post("/v1/models/digits:predict", content=b"{", headers={"x-request-id": "bad-1"})
    assert bad.headers["x-request-id"] == "bad-1"
    labels = {"model": "digits", "version": "1", "protocol": "tfserving_rest", "code": "OK"}
    assert prometheus.get_sample_value("modelloop_requests_total", labels) == 1.0
    # The body failed to decode after the version resolved: counted once, with that version.
    rejected = {"model": "digits", "version": "1", "protocol": "tfserving_rest", "code": "INVALID_ARGUMENT"}
    assert prometheus.get_sample_value("modelloop_requests_total", rejected) == 1.0
    assert "modelloop_requests_total" in (await client.get("/metrics")).text


async def test_status_metadata_and_health(client: httpx.AsyncClient) -> None:
    status = (await client.get("/v1/models/digits")).json()
    assert status == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    meta = (await client.get("/v1/models/digits/metadata")).json()
    golden = json.loads((TESTDATA / "tfserving-metadata-response.json").read_text())
    assert (
        meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
        == (golden["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"])
    )
    v2 = (await client.get("/v2/models/digits")).json()
    assert v2["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert v2["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert v2["versions"] == ["1"]
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/models/digits/versions/1/ready")).status_code == 200
    assert "digits" in (await client.get("/")).text


@pytest.mark.parametrize(
    ("path", "body", "status", "match"),
    [
        ("/v1/models/digits:predict", b"{oops", 400, "malformed JSON"),
        ("/v1/models/digits:predict", [ROW], 400, "must be a JSON object"),
        ("/v1/models/digits:predict", {"instances": [ROW], "inputs": [ROW]}, 400, "both"),
        ("/v1/models/digits:predict", {"instances": [ROW, ROW[:10]]}, 400, "ragged"),
        ("/v1/models/digits:predict", {"instances": [ROW[:10]]}, 400, "64"),
        ("/v1/models/digits:predict", {"instances": [[ROW]]}, 400, "pixels"),
        ("/v1/models/digits:predict", {"instances": [["x"] * 64]}, 400, "string"),
        ("/v1/models/digits:predict", {"instances": [[None] * 64]}, 400, "null"),
        ("/v1/models/digits:predict", {"instances": [[False] * 64]}, 400, "boolean"),
        ("/v1/models/digits:predict", {"instances": []}, 400, "empty batch"),
        ("/v1/models/digits:predict", {"instances": [ROW] * 5000}, 413, "larger than the limit"),
        ("/v1/models/digits:predict", {"instances": [ROW], "signature_name": "x"}, 404, "signature"),
        ("/v1/models/digits:predict", {"inputs": {"image": [ROW]}}, 400, 'unknown input "image"'),
        ("/v1/models/nope:predict", {"instances": [ROW]}, 404, "nope"),
        ("/v1/models/digits/versions/7:predict", {"instances": [ROW]}, 404, "7"),
        ("/v1/models/digits/labels/canary:predict", {"instances": [ROW]}, 404, "canary"),
        ("/v1/models/digits/versions/one:predict", {"instances": [ROW]}, 400, "integer"),
        ("/v1/models/digits:classify", {"examples": []}, 501, "not implemented"),
        ("/v2/models/digits/infer", v2_body(ROW, [2, 64]), 400, "needs 128 elements"),
        ("/v2/models/digits/infer", v2_body(ROW, [1, 64], "FP128"), 400, "FP128"),
        ("/v2/models/digits/infer", v2_body(ROW[:8], [1, 8]), 400, "64"),
        ("/v2/models/digits/infer", v2_body(ROW, [1, 64], name="image"), 400, "image"),
        (
            "/v2/models/digits/infer",
            {**v2_body(ROW, [1, 64]), "outputs": [{"name": "logits"}]},
            400,
            "logits",
        ),
        ("/v2/models/nope/infer", v2_body(ROW, [1, 64]), 404, "nope"),
        ("/v2/models/digits/versions/3/infer", v2_body(ROW, [1, 64]), 404, "3"),
    ],
)
async def test_bad_inputs_are_4xx_with_a_message(
    client: httpx.AsyncClient, path: str, body: object, status: int, match: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(path, content=content)
    assert_error(response, status, match)
    assert "x-request-id" in response.headers
    # The server keeps serving after each bad request.
    ok = await client.post("/v1/models/digits:predict", json={"instances": [ROW]})
    assert ok.status_code == 200


async def test_wrong_content_type_and_nan(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/models/digits:predict",
        content=json.dumps({"instances": [ROW]}),
        headers={"content-type": "text/xml"},
    )
    assert_error(response, 415, "unsupported content type")
    nan_row = "[" + ",".join(["NaN"] * 64) + "]"
    response = await client.post(
        "/v1/models/digits:predict", content=f'{{"instances": [{nan_row}]}}'.encode()
    )
    assert response.status_code == 200
    assert all(math.isnan(v) for v in response.json()["predictions"][0])


async def test_bytes_binary_input_is_refused_by_the_model(client: httpx.AsyncClient) -> None:
    packed = struct.pack("<I", 1) + b"a"
    header = json.dumps(
        {
            "inputs": [
                {"name": "pixels", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}
            ]
        }
    ).encode()
    response = await client.post(
        "/v2/models/digits/infer",
        content=header + packed,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_error(response, 400, "pixels")
