"""A real ``modelloop serve`` on port 0, driven by the clients users already have.

The same golden rows go through TF Serving REST (row and columnar), TF Serving gRPC
(tensor_content and float_val), OIP REST, OIP gRPC (typed and raw contents), tritonclient
http and grpc, and curl. Every answer must equal ONNX Runtime's on the published file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from tests.tools import clients_python, dump_dom, require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


@pytest.fixture(scope="module")
def rows(digits_run: Path) -> np.ndarray:
    return np.load(digits_run / "split.npz")["x_test"][:8].astype(np.float32)


@pytest.fixture(scope="module")
def expected(served_repo: Path, rows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(served_repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["probabilities"], {"pixels": rows})[0]


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def _tensor_proto(rows: np.ndarray, typed: bool):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in rows.shape]
    )
    if typed:
        return tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=rows.ravel().tolist()
        )
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=rows.tobytes())


def test_tfserving_rest_row_format(server, rows, expected):
    r = httpx.post(
        f"{server.rest_url}/v1/models/digits:predict", json={"instances": rows.tolist()}, timeout=10
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["predictions"]), expected, atol=ATOL)
    assert len(r.headers["x-request-id"]) >= 16


def test_tfserving_rest_columnar_format_with_version_and_client_request_id(server, rows, expected):
    r = httpx.post(
        f"{server.rest_url}/v1/models/digits/versions/1:predict",
        json={"inputs": {"pixels": rows.tolist()}, "signature_name": "serving_default"},
        headers={"x-request-id": "client-chosen-id-42"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"]), expected, atol=ATOL)
    assert r.headers["x-request-id"] == "client-chosen-id-42"


@pytest.mark.parametrize("typed", [False, True], ids=["tensor_content", "float_val"])
def test_tfserving_grpc_predict(channel, rows, expected, typed):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.signature_name = "serving_default"
    request.inputs["pixels"].CopyFrom(_tensor_proto(rows, typed))
    response, call = stub.Predict.with_call(request, timeout=10, metadata=[("x-request-id", "grpc-id-7")])
    out = response.outputs["probabilities"]
    got = (
        np.frombuffer(out.tensor_content, dtype=np.float32) if out.tensor_content else np.array(out.float_val)
    )
    np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=ATOL)
    assert response.model_spec.version.value == 1
    # The id travels with the status, in the trailing metadata (no extra round per call).
    assert dict(call.trailing_metadata())["x-request-id"] == "grpc-id-7"


def test_tfserving_grpc_metadata_and_status(channel):
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    response = stub.GetModelMetadata(request, timeout=10)
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigmap)
    signature = sigmap.signature_def["serving_default"]
    assert list(signature.inputs) == ["pixels"]
    assert [d.size for d in signature.inputs["pixels"].tensor_shape.dim] == [-1, 64]
    assert list(signature.outputs) == ["probabilities"]

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "digits"}), timeout=10
    )
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]


def test_tfserving_grpc_unknown_model_is_not_found(channel, rows):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "nope"
    request.inputs["pixels"].CopyFrom(_tensor_proto(rows, False))
    with pytest.raises(grpc.RpcError) as info:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in info.value.details()


def test_oip_rest_infer(server, rows, expected):
    body = {
        "id": "oip-1",
        "inputs": [
            {"name": "pixels", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ],
    }
    r = httpx.post(f"{server.rest_url}/v2/models/digits/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    payload = r.json()
    assert payload["id"] == "oip-1" and payload["model_name"] == "digits"
    (out,) = payload["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [8, 10] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(8, 10), expected, atol=ATOL)


@pytest.mark.parametrize("raw", [False, True], ids=["typed-contents", "raw-contents"])
def test_oip_grpc_infer(channel, rows, expected, raw):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    request = oip.ModelInferRequest(model_name="digits", id="oip-grpc")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=list(rows.shape))
    if raw:
        request.raw_input_contents.append(rows.tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    response = stub.ModelInfer(request, timeout=10)
    assert response.id == "oip-grpc" and response.model_version == "1"
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(8, 10)
    np.testing.assert_allclose(got, expected, atol=ATOL)


def test_health_readiness_and_metadata_over_rest(server):
    assert httpx.get(f"{server.rest_url}/v2/health/live", timeout=5).status_code == 200
    assert httpx.get(f"{server.rest_url}/v2/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{server.rest_url}/v2/models/digits/ready", timeout=5).status_code == 200
    meta = httpx.get(f"{server.rest_url}/v2/models/digits", timeout=5).json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    status = httpx.get(f"{server.rest_url}/v1/models/digits", timeout=5).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"


def test_readme_curl_examples(server, rows, expected):
    curl = require_tool("curl", "Debian package curl")
    body = json.dumps({"instances": rows[:1].tolist()})
    out = subprocess.run(
        [
            curl,
            "-s",
            "-X",
            "POST",
            f"{server.rest_url}/v1/models/digits:predict",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    np.testing.assert_allclose(np.array(json.loads(out)["predictions"]), expected[:1], atol=ATOL)
    out = subprocess.run(
        [curl, "-s", f"{server.rest_url}/v1/models/digits/metadata"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "serving_default" in json.loads(out)["metadata"]["signature_def"]["signature_def"]
    code = subprocess.run(
        [
            curl,
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            f"{server.rest_url}/v1/models/digits:predict",
            "-H",
            "content-type: application/json",
            "-d",
            "{bad",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert code == "400"


def test_tritonclient_http_and_grpc_unchanged(server, rows, expected, tmp_path):
    python = clients_python()
    rows_path = tmp_path / "rows.json"
    rows_path.write_text(json.dumps(rows.tolist()))
    http_target = server.rest_url.removeprefix("http://")
    proc = subprocess.run(
        [
            python,
            str(Path(__file__).parent / "tritonclient_e2e.py"),
            http_target,
            server.grpc_target,
            str(rows_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("http_live", "http_ready", "http_model_ready", "grpc_live", "grpc_ready", "grpc_model_ready"):
        assert result[key] is True, key
    for key in ("http_binary", "http_json", "grpc"):
        np.testing.assert_allclose(np.array(result[key]), expected, atol=ATOL, err_msg=key)
    assert result["http_binary_id"] == "triton-http-1"
    assert result["grpc_id"] == "triton-grpc-1"
    assert result["http_metadata"]["inputs"][0]["name"] == "pixels"
    assert result["grpc_metadata"]["outputs"][0]["name"] == "probabilities"
    assert "no-such-model" in result["http_unknown_model_error"]
    assert "64" in result["grpc_bad_shape_error"]
    _check_statistics(result)


def _check_statistics(result: dict) -> None:
    """What tritonclient read from the statistics extension after its own requests."""
    [http] = result["http_stats"]["model_stats"]
    assert (http["name"], http["version"]) == ("digits", "1")
    # Two HTTP infers (binary, JSON) of 8 rows, one gRPC infer; the bad-shape call failed.
    assert http["inference_count"] >= 24 and http["execution_count"] >= 3
    stats = http["inference_stats"]
    assert stats["success"]["count"] >= 3 and stats["fail"]["count"] >= 1
    assert stats["compute_infer"]["ns"] > 0 and http["last_inference"] > 0
    assert any(batch["batch_size"] == 8 for batch in http["batch_stats"])
    assert [s["name"] for s in result["http_stats_all"]["model_stats"]] == ["digits"]
    [grpc_stats] = result["grpc_stats"]["model_stats"]
    # protobuf's JSON writes uint64 as strings.
    assert int(grpc_stats["inference_count"]) >= 24 and grpc_stats["version"] == "1"
    assert int(grpc_stats["inference_stats"]["success"]["count"]) >= 3
    for key in ("http_aio_stats", "grpc_aio_stats"):
        [entry] = result[key]["model_stats"]
        assert int(entry["inference_count"]) >= int(grpc_stats["inference_count"]), key
    for key in ("server_extensions", "grpc_server_extensions"):
        assert "statistics" in result[key] and "binary_tensor_data" in result[key], key


def test_metrics_count_every_protocol(server, channel, rows, expected):
    # One request over each protocol here, whichever of the module's tests ran before.
    test_tfserving_rest_row_format(server, rows, expected)
    test_tfserving_grpc_predict(channel, rows, expected, typed=True)
    test_oip_rest_infer(server, rows, expected)
    test_oip_grpc_infer(channel, rows, expected, raw=False)
    text = httpx.get(f"{server.rest_url}/metrics", timeout=5).text
    for protocol in ("tfserving_rest", "tfserving_grpc", "v2_rest", "v2_grpc"):
        assert f'protocol="{protocol}"' in text, protocol
    assert "modelloop_request_duration_seconds_bucket" in text
    assert 'modelloop_model_versions_loaded{model="digits"} 1.0' in text


def _raw_http(server, payload: bytes) -> bytes:
    import socket

    host, port = server.rest_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the client is done; a short body stays short
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_broken_request_line_gets_400_and_the_server_keeps_serving(server, rows, expected):
    reply = _raw_http(server, b"THIS IS NOT HTTP\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:100]
    test_tfserving_rest_row_format(server, rows, expected)


def test_body_shorter_than_its_content_length_is_not_a_server_error(server, rows, expected):
    reply = _raw_http(
        server,
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\nConnection: close\r\n\r\n{"instances": [[1',
    )
    # The server waits for the rest of the body and gives up; it never answers 5xx.
    assert not reply.startswith(b"HTTP/1.1 5"), reply[:100]
    test_tfserving_rest_row_format(server, rows, expected)


def test_a_server_of_onnx_models_loads_no_tensorflow(server):
    # The TF Serving protocol comes from the generated modules: no TensorFlow library is
    # mapped into a server whose repository holds only ONNX models.
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    assert "onnxruntime" in maps
    assert "tensorflow" not in maps


def test_the_model_config_says_how_onnx_runtime_runs(server):
    config = httpx.get(f"{server.rest_url}/v2/models/digits/config", timeout=5).json()
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert parameters["providers"] == "CPUExecutionProvider"
    assert parameters["allow_spinning"] == "false"
    assert int(parameters["intra_op_num_threads"]) == len(os.sched_getaffinity(0))
    assert parameters["thread_sizing"].startswith(f"{len(os.sched_getaffinity(0))} CPU")
    assert (
        "model digits version 1: ONNX Runtime providers ['CPUExecutionProvider'], intra_op_num_threads"
        in (server.output())
    )


def _request_examples(document: dict, path: str) -> dict[str, dict]:
    content = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return {name: example["value"] for name, example in content["examples"].items()}


def test_the_documented_examples_run_against_the_served_model(server):
    """What /docs offers under "Try it out" works as it stands, with its path examples."""
    document = httpx.get(f"{server.rest_url}/openapi.json", timeout=10).json()
    sent = 0
    for template in ("/v1/models/{model_method}", "/v2/models/{model}/infer"):
        params = {
            p["name"]: p["example"]
            for p in document["paths"][template]["post"]["parameters"]
            if p["in"] == "path"
        }
        url = server.rest_url + template.format(**params)
        for name, body in _request_examples(document, template).items():
            r = httpx.post(url, json=body, timeout=10)
            assert r.status_code == 200, (name, r.text)
            answer = r.json()
            if "model_name" in answer:  # OIP: flat data of the first output
                probabilities = answer["outputs"][0]["data"]
            else:  # TF Serving: predictions (row) or outputs (columnar), first row
                probabilities = answer.get("predictions", answer.get("outputs"))[0]
            # The example row is a handwritten 0, as the README's curl line says.
            assert int(np.argmax(probabilities)) == 0, (name, answer)
            sent += 1
    assert sent >= 5


def test_docs_render_offline_in_headless_chromium(server, tmp_path):
    """Swagger UI and ReDoc come from the server itself: with every address but loopback cut
    off, both render every operation; FastAPI's stock page (a CDN) stays blank."""
    from fastapi.openapi.docs import get_swagger_ui_html

    swagger = dump_dom(f"{server.rest_url}/docs", offline=True)
    for text in (
        'class="swagger-ui"',
        "/v1/models/{model_method}",
        "/v2/models/{model}/infer",
        "/monitoring/alerts",
    ):
        assert text in swagger, text
    assert "Predict (or classify/regress) with the latest version" in swagger
    redoc = dump_dom(f"{server.rest_url}/redoc", offline=True)
    assert "Inference (latest version)" in redoc and "Labels for logged predictions, by request id" in redoc

    # The control: the same document behind FastAPI's default page, whose script is on a CDN.
    stock = tmp_path / "stock-docs.html"
    stock.write_bytes(get_swagger_ui_html(openapi_url=f"{server.rest_url}/openapi.json", title="stock").body)
    blank = dump_dom(stock.as_uri(), offline=True)
    assert "/v1/models/{model_method}" not in blank and "opblock" not in blank

    asset = httpx.get(f"{server.rest_url}/docs/assets/swagger-ui-bundle.js", timeout=10)
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in asset.text
    unknown = httpx.get(f"{server.rest_url}/docs/assets/swagger-initializer.js", timeout=10)
    assert unknown.status_code == 404 and "swagger-initializer.js" in unknown.json()["error"]
