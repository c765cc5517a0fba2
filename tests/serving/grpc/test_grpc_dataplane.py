"""The gRPC server over the real DataPlane and the published ``digits`` model (ONNX Runtime).

The edge tests with fake runtimes are in ``test_grpc_server.py``; these keep one real
model on the wire, so that what ONNX Runtime answers is what a client reads.

TF Serving stubs from ``tensorflow_serving.apis`` and our own OIP stubs in-process;
tritonclient's gRPC client in a subprocess (its generated module would clash with ours).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.python.framework import tensor_util
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from modelloop.serving.dataplane import DataPlane
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc

from ..edge_support import MIB, grpc_channel, model_infer_request, run_client_script, serve

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
TRITON_SCRIPT = Path(__file__).with_name("tritonclient_grpc_check.py")
# The repository index is an admin RPC: tritonclient sends the token as a header.
TRITON_ADMIN = "triton-admin-token"
ROWS = np.array(
    json.loads((TESTDATA / "tfserving-predict-request.json").read_text())["instances"], np.float32
)
BIG_ROWS = 20_000  # 20 000 x 64 float32 = 5.1 MB: over gRPC's 4 MiB default


class Served:
    """A started server, the clients that talk to it, and its metrics registry."""

    def __init__(self, port: int, channel: grpc.aio.Channel, prometheus: CollectorRegistry) -> None:
        self.port = port
        self.tfs = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)
        self.oip = pb_grpc.GRPCInferenceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.prometheus = prometheus


@pytest.fixture
async def served(digits_repo: Path) -> AsyncIterator[tuple[Served, DataPlane]]:
    # Large enough that a >4 MiB request is one legal batch.
    batching = {"max_batch_size": BIG_ROWS, "batch_timeout_micros": 0}
    async with (
        serve(digits_repo, real_runtimes=True, batching=batching, admin_token=TRITON_ADMIN) as stack,
        grpc_channel(stack) as (port, channel),
    ):
        yield Served(port, channel, stack.prometheus), stack.dataplane


@pytest.fixture
def onnx_probabilities(digits_repo: Path) -> np.ndarray:
    """What onnxruntime itself answers for the golden rows on the published file."""
    session = onnxruntime.InferenceSession(
        str(digits_repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: ROWS})[0]


async def _error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def _predict(
    pixels: np.ndarray, encoding: str = "tensor_content", **spec: object
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = str(spec.pop("name", "digits"))
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = int(value)  # type: ignore[call-overload]
        else:
            setattr(request.model_spec, key, value)
    tensor = request.inputs["pixels"]
    tensor.CopyFrom(tensor_util.make_tensor_proto(pixels))
    if encoding == "float_val":
        tensor.ClearField("tensor_content")
        tensor.float_val.extend(pixels.reshape(-1).tolist())
    return request


_infer = model_infer_request


def _oip_output(response: pb.ModelInferResponse, name: str = "probabilities") -> np.ndarray:
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.name == name:
            assert output.datatype == "FP32"
            return np.frombuffer(raw, "<f4").reshape(tuple(output.shape))
    raise AssertionError(f"no output {name!r}")


async def test_every_encoding_gives_onnxruntimes_answer(served, onnx_probabilities: np.ndarray) -> None:
    s, _ = served
    results = {}
    for encoding in ("tensor_content", "float_val"):
        response = await s.tfs.Predict(_predict(ROWS, encoding))
        assert response.model_spec.version.value == 1
        results[encoding] = tensor_util.MakeNdarray(response.outputs["probabilities"])
    golden = text_format.Parse(
        (TESTDATA / "tfserving_grpc_predict_digits.pbtxt").read_text(), predict_pb2.PredictRequest()
    )
    assert (await s.tfs.Predict(golden)).outputs["probabilities"].tensor_shape.dim[1].size == 10
    for raw in (True, False):
        results[f"oip raw={raw}"] = _oip_output(await s.oip.ModelInfer(_infer(ROWS, raw=raw)))
    for name, probabilities in results.items():
        np.testing.assert_allclose(probabilities, onnx_probabilities, rtol=1e-5, atol=1e-6, err_msg=name)
    assert results["tensor_content"].argmax(axis=1).tolist() == [0, 1]


async def test_request_ids_and_metrics(served) -> None:
    s, _ = served
    call = s.tfs.Predict(_predict(ROWS), metadata=(("x-request-id", "tfs-1"),))
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "tfs-1"
    call = s.tfs.Predict(_predict(ROWS))
    await call
    generated = dict(await call.trailing_metadata())["x-request-id"]
    assert len(generated) == 32
    call = s.oip.ModelInfer(_infer(ROWS, id="oip-1"))
    assert (await call).id == "oip-1"
    assert dict(await call.trailing_metadata())["x-request-id"] == "oip-1"
    await _error(s.tfs.Predict(_predict(ROWS[:, :8])))
    bad = _infer(ROWS)
    bad.raw_input_contents[0] = b"\0" * 3
    await _error(s.oip.ModelInfer(bad))

    def count(protocol: str, code: str, version: str) -> float | None:
        labels = {"model": "digits", "version": version, "protocol": protocol, "code": code}
        return s.prometheus.get_sample_value("modelloop_requests_total", labels)

    assert count("tfserving_grpc", "OK", "1") == 2
    assert count("v2_grpc", "OK", "1") == 1
    assert count("tfserving_grpc", "INVALID_ARGUMENT", "1") == 1  # failed validation in the data plane
    # Failed to decode, after the version resolved: counted once, with that version.
    assert count("v2_grpc", "INVALID_ARGUMENT", "1") == 1


async def test_metadata_status_health_and_reflection(served) -> None:
    s, dataplane = served
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    response = await s.tfs.GetModelMetadata(request)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.inputs["pixels"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in signature.inputs["pixels"].tensor_shape.dim] == [-1, 64]
    assert [d.size for d in signature.outputs["probabilities"].tensor_shape.dim] == [-1, 10]

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "digits"
    status = await s.models.GetModelStatus(status_request)
    assert [(v.version, v.state) for v in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]

    assert (await s.oip.ServerLive(pb.ServerLiveRequest())).live
    assert (await s.oip.ServerReady(pb.ServerReadyRequest())).ready
    assert (await s.oip.ModelReady(pb.ModelReadyRequest(name="digits", version="1"))).ready
    model = await s.oip.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert (list(model.versions), [list(t.shape) for t in model.inputs]) == (["1"], [[-1, 64]])
    assert (await s.oip.ServerMetadata(pb.ServerMetadataRequest())).name == "modelloop"

    serving = health_pb2.HealthCheckResponse.SERVING
    assert (await s.health.Check(health_pb2.HealthCheckRequest())).status == serving

    async def list_services() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    replies = [r async for r in s.reflection.ServerReflectionInfo(list_services())]
    names = {service.name for service in replies[0].list_services_response.service}
    assert {
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    } <= names

    await dataplane.drain(0.1)
    assert (
        await s.health.Check(health_pb2.HealthCheckRequest())
    ).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not (await s.oip.ServerReady(pb.ServerReadyRequest())).ready
    await dataplane.stop()
    error = await _error(s.tfs.Predict(_predict(ROWS)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()


async def test_messages_over_4_mib(served) -> None:
    s, _ = served
    pixels = np.tile(ROWS, (BIG_ROWS // 2, 1))
    assert pixels.nbytes > 4 * MIB
    response = await s.tfs.Predict(_predict(pixels))
    assert tensor_util.MakeNdarray(response.outputs["probabilities"]).shape == (BIG_ROWS, 10)
    response = await s.oip.ModelInfer(_infer(pixels))
    assert _oip_output(response).shape == (BIG_ROWS, 10)


def _tensor(dtype: int, dims: list[int], **values: object) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for d in dims:
        proto.tensor_shape.dim.add(size=d)
    return proto


def _predict_with(tensor: tensor_pb2.TensorProto, name: str = "pixels") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs[name].CopyFrom(tensor)
    return request


NOT_FOUND, INVALID, UNIMPLEMENTED = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
)


def _bad_predicts() -> list[tuple[str, predict_pb2.PredictRequest, grpc.StatusCode, str]]:
    unknown_output = _predict(ROWS)
    unknown_output.output_filter.append("logits")
    return [
        ("model", _predict(ROWS, name="nope"), NOT_FOUND, "nope"),
        ("version", _predict(ROWS, version=7), NOT_FOUND, "7"),
        ("label", _predict(ROWS, version_label="canary"), NOT_FOUND, "canary"),
        ("signature", _predict(ROWS, signature_name="classify_x"), NOT_FOUND, "classify_x"),
        ("input", _predict_with(tensor_util.make_tensor_proto(ROWS), "image"), INVALID, "'image'"),
        ("output", unknown_output, INVALID, "'logits'"),
        ("features", _predict(ROWS[:, :63]), INVALID, "64"),
        ("rank", _predict(ROWS.reshape(2, 8, 8)), INVALID, "rank"),
        ("empty", _predict(ROWS[:0]), INVALID, "empty batch"),
        (
            "content",
            _predict_with(_tensor(types_pb2.DT_FLOAT, [2, 64], tensor_content=b"\0" * 500)),
            INVALID,
            "500",
        ),
        (
            "val count",
            _predict_with(_tensor(types_pb2.DT_FLOAT, [2, 64], float_val=[1.0] * 100)),
            INVALID,
            "100",
        ),
        ("dtype", _predict_with(_tensor(types_pb2.DT_COMPLEX64, [1, 64], float_val=[1.0])), INVALID, "dtype"),
        (
            "strings",
            _predict_with(_tensor(types_pb2.DT_STRING, [1, 64], string_val=[b"x"])),
            INVALID,
            "string",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "message", "code", "fragment"), _bad_predicts(), ids=[c[0] for c in _bad_predicts()]
)
async def test_bad_predicts_get_a_client_error_and_the_server_keeps_serving(
    served, case: str, message: predict_pb2.PredictRequest, code: grpc.StatusCode, fragment: str
) -> None:
    s, _ = served
    error = await _error(s.tfs.Predict(message))
    assert error.code() == code and fragment in error.details(), (error.code(), error.details())
    assert (await s.tfs.Predict(_predict(ROWS))).outputs


def _bad_infers() -> list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]]:
    shape = _infer(ROWS, raw=False)
    shape.inputs[0].shape[:] = [3, 64]
    raw_shape = _infer(ROWS)
    raw_shape.inputs[0].shape[:] = [1, 64]
    datatype = _infer(ROWS)
    datatype.inputs[0].datatype = "FP128"
    wrong_type = _infer(ROWS.astype(np.int64).astype(np.float32))
    wrong_type.inputs[0].datatype = "BYTES"
    name = _infer(ROWS)
    name.inputs[0].name = "image"
    output = _infer(ROWS)
    output.outputs.add(name="logits")
    unknown_model = _infer(ROWS)
    unknown_model.model_name = "nope"
    return [
        ("model", unknown_model, NOT_FOUND, "nope"),
        ("version", _infer(ROWS, model_version="3"), NOT_FOUND, "3"),
        ("shape vs contents", shape, INVALID, "needs 192 elements"),
        ("shape vs raw", raw_shape, INVALID, "512 bytes"),
        ("datatype", datatype, INVALID, "FP128"),
        ("bytes", wrong_type, INVALID, "BYTES"),
        ("input", name, INVALID, "'image'"),
        ("output", output, INVALID, "'logits'"),
        ("features", _infer(ROWS[:, :8]), INVALID, "64"),
    ]


@pytest.mark.parametrize(
    ("case", "message", "code", "fragment"), _bad_infers(), ids=[c[0] for c in _bad_infers()]
)
async def test_bad_infers_get_a_client_error_and_the_server_keeps_serving(
    served, case: str, message: pb.ModelInferRequest, code: grpc.StatusCode, fragment: str
) -> None:
    s, _ = served
    error = await _error(s.oip.ModelInfer(message))
    assert error.code() == code and fragment in error.details(), (error.code(), error.details())
    assert (await s.oip.ModelInfer(_infer(ROWS))).outputs


async def test_classify_is_unimplemented(served) -> None:
    s, _ = served
    error = await _error(s.tfs.Classify(classification_pb2.ClassificationRequest()))
    assert error.code() == UNIMPLEMENTED and "Classify" in error.details()


async def test_tritonclient_grpc(digits_repo: Path, tmp_path: Path, onnx_probabilities: np.ndarray) -> None:
    pixels_path = tmp_path / "pixels.npy"
    np.save(pixels_path, ROWS)
    # The repository index is an admin call: the script sends this token.
    async with (
        serve(digits_repo, real_runtimes=True, admin_token="triton-check-token") as stack,
        grpc_channel(stack) as (port, _),
    ):
        await run_client_script(str(TRITON_SCRIPT), str(port), str(pixels_path), "triton-check-token")
    got = np.load(str(pixels_path) + ".out.npy")
    np.testing.assert_allclose(got, onnx_probabilities, rtol=1e-5, atol=1e-6)
