"""The gRPC edge over the real DataPlane with fake runtimes: every service, request ids, every error.

The stack is the production one (repository, registry, data plane; see
``tests/serving/edge_support.py``) serving ``digits`` versions 1 and 2 (label ``stable``
-> 1; outputs ``probabilities`` and ``label``) and version 3, which fails to load. What a
request did is read back from the fake runtimes' records and the Prometheus registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.python.framework import tensor_util
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from modelloop import __version__
from modelloop.serving.errors import (
    ErrorCode,
    InvalidInput,
    ModelNotReady,
    QueueFull,
    ServingError,
    Unimplemented,
)
from modelloop.serving.grpc import errors as grpc_errors
from modelloop.serving.grpc.server import bind_grpc_server, create_grpc_server
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc

from ..edge_support import (
    MIB,
    EdgeStack,
    GatedRuntime,
    RuntimeFactory,
    RuntimeMaker,
    UnencodableRuntime,
    digits_probabilities,
    failing,
    grpc_channel,
    model_infer_request,
    serve,
    write_digits,
    write_version,
)
from ..fakes import FailingLoadRuntime

ADMIN = "s3cret"
BIG_ROWS = 20_000  # 20 000 x 64 float32 = 5.1 MB: over gRPC's 4 MiB default, under our 16 MiB limit
FRESH_ID = re.compile(r"[0-9a-f]{32}")
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _pixels(rows: int = 2) -> np.ndarray:
    return (np.arange(rows * 64, dtype=np.float32).reshape(rows, 64) % 17).astype(np.float32)


class Edge:
    """A started gRPC server over an :class:`EdgeStack`, with a stub per service."""

    def __init__(self, stack: EdgeStack, port: int, channel: grpc.aio.Channel) -> None:
        self.stack = stack
        self.port = port
        self.channel = channel
        self.tfs = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)
        self.oip = pb_grpc.GRPCInferenceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def calls(self, version: int) -> list[dict[str, np.ndarray]]:
        """The inputs every predict of that ``digits`` version's fake received."""
        return self.stack.factory.runtime("digits", version).calls

    def no_inference(self) -> bool:
        return all(not getattr(runtime, "calls", []) for runtime in self.stack.factory.built)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_digits(repo, (1, 2, 3), label_output=True)
    return repo


@contextlib.asynccontextmanager
async def grpc_edge(
    repo: Path, overrides: dict[tuple[str, int], RuntimeMaker] | None = None, **settings: Any
) -> AsyncIterator[Edge]:
    """The server the tests call; ``overrides`` swap runtimes, ``settings`` change settings."""
    factory = RuntimeFactory({("digits", 3): FailingLoadRuntime, **(overrides or {})})
    settings.setdefault("admin_token", ADMIN)
    settings.setdefault("grpc_max_message_bytes", 16 * MIB)
    settings.setdefault("batching", {"max_batch_size": BIG_ROWS})
    async with serve(repo, factory, **settings) as stack, grpc_channel(stack) as (port, channel):
        yield Edge(stack, port, channel)


@pytest.fixture
async def edge(repo: Path) -> AsyncIterator[Edge]:
    async with grpc_edge(repo) as edge:
        yield edge


async def _error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def _trailing_id(error: grpc.aio.AioRpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("x-request-id")


async def _with_call(method: grpc.aio.UnaryUnaryMultiCallable, request: object, **kwargs: object) -> tuple:
    """Calls a unary method and returns the response with the call (for its metadata)."""
    call = method(request, **kwargs)
    return await call, call


def _predict_request(pixels: np.ndarray | None = None, **spec: object) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = str(spec.pop("name", "digits"))
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = int(value)  # type: ignore[call-overload]
        else:
            setattr(request.model_spec, key, value)
    request.inputs["pixels"].CopyFrom(tensor_util.make_tensor_proto(_pixels() if pixels is None else pixels))
    return request


def _infer_request(
    pixels: np.ndarray | None = None, raw: bool = True, **fields: object
) -> pb.ModelInferRequest:
    return model_infer_request(_pixels() if pixels is None else pixels, raw, **fields)


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    result: dict[str, np.ndarray] = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "BYTES":
            values, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                values.append(raw[offset + 4 : offset + 4 + length])
                offset += 4 + length
            result[output.name] = np.array(values, dtype=object).reshape(tuple(output.shape))
        else:
            assert output.datatype == "FP32"
            result[output.name] = np.frombuffer(raw, dtype="<f4").reshape(tuple(output.shape))
    return result


# --- PredictionService -------------------------------------------------------------------


async def test_predict_with_tensor_content(edge: Edge) -> None:
    request = _predict_request()
    assert request.inputs["pixels"].tensor_content
    response, call = await _with_call(edge.tfs.Predict, request)
    probabilities = tensor_util.MakeNdarray(response.outputs["probabilities"])
    np.testing.assert_array_equal(probabilities, digits_probabilities(_pixels()))
    assert response.model_spec.name == "digits"
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    labels = tensor_util.MakeNdarray(response.outputs["label"])
    assert labels.tolist() == [b"9", b"3"]  # where each row's largest of its first ten pixels is
    assert FRESH_ID.fullmatch(dict(await call.trailing_metadata())["x-request-id"])
    assert edge.calls(1) == [] and len(edge.calls(2)) == 1
    assert edge.stack.requests() == {("digits", "2", "tfserving_grpc", "OK"): 1}


async def test_predict_with_float_val_version_label_and_output_filter(edge: Edge) -> None:
    request = _predict_request(version_label="stable", signature_name="serving_default")
    tensor = request.inputs["pixels"]
    tensor.ClearField("tensor_content")
    tensor.float_val.extend(_pixels().reshape(-1).tolist())
    request.output_filter.append("probabilities")
    response, call = await _with_call(edge.tfs.Predict, request, metadata=(("x-request-id", "client-42"),))
    assert list(response.outputs) == ["probabilities"]
    assert response.model_spec.version.value == 1
    assert dict(await call.trailing_metadata())["x-request-id"] == "client-42"
    (sent,) = edge.calls(1)
    np.testing.assert_array_equal(sent["pixels"], _pixels())
    assert edge.calls(2) == []


@pytest.mark.parametrize(
    ("spec", "code", "fragment", "model"),
    [
        ({"name": "nope"}, NOT_FOUND, "model 'nope' not found", ""),
        ({"version": 9}, NOT_FOUND, "no loaded version 9", "digits"),
        ({"version_label": "canary"}, NOT_FOUND, "no version label 'canary'", "digits"),
        (
            {"version": 3},
            grpc.StatusCode.UNAVAILABLE,
            "version 3 is FAILED: ValueError: corrupt model",
            "digits",
        ),
    ],
)
async def test_predict_resolution_errors(
    edge: Edge, spec: dict, code: grpc.StatusCode, fragment: str, model: str
) -> None:
    error = await _error(edge.tfs.Predict(_predict_request(**spec)))
    assert error.code() == code
    assert fragment in error.details()
    assert FRESH_ID.fullmatch(_trailing_id(error) or "")
    assert edge.stack.requests() == {(model, "", "tfserving_grpc", code.name): 1}
    assert edge.no_inference()


async def test_predict_unknown_signature(edge: Edge) -> None:
    error = await _error(edge.tfs.Predict(_predict_request(signature_name="classify")))
    assert error.code() == NOT_FOUND
    assert "model 'digits' has no signature 'classify'; it serves 'serving_default'" in error.details()
    assert edge.stack.requests() == {("digits", "2", "tfserving_grpc", "NOT_FOUND"): 1}


async def test_predict_unknown_input_and_output(edge: Edge) -> None:
    request = _predict_request()
    request.inputs["pixelz"].CopyFrom(request.inputs["pixels"])
    error = await _error(edge.tfs.Predict(request))
    assert error.code() == INVALID and "unknown input 'pixelz'" in error.details()
    request = _predict_request()
    request.output_filter.append("logits")
    error = await _error(edge.tfs.Predict(request))
    assert error.code() == INVALID and "unknown output 'logits'" in error.details()
    assert edge.no_inference()


def _bad_tensors() -> list[tuple[str, tensor_pb2.TensorProto, str]]:
    def tensor(dtype: int, dims: list[int], **values: object) -> tensor_pb2.TensorProto:
        proto = tensor_pb2.TensorProto(dtype=dtype, **values)
        for d in dims:
            proto.tensor_shape.dim.add(size=d)
        return proto

    return [
        (
            "short content",
            tensor(types_pb2.DT_FLOAT, [1, 64], tensor_content=b"\0" * 255),
            "tensor_content has 255",
        ),
        ("val count", tensor(types_pb2.DT_FLOAT, [1, 64], float_val=[1.0] * 63), "float_val has 63 values"),
        ("no values", tensor(types_pb2.DT_FLOAT, [1, 64]), "needs 64 value(s)"),
        ("dtype", tensor(types_pb2.DT_COMPLEX64, [1], float_val=[1.0]), "unsupported dtype"),
        ("negative", tensor(types_pb2.DT_FLOAT, [-1, 64], float_val=[1.0]), "negative dimension"),
    ]


@pytest.mark.parametrize(("case", "tensor", "fragment"), _bad_tensors(), ids=[c[0] for c in _bad_tensors()])
async def test_predict_bad_tensors_are_invalid_argument_and_counted(
    edge: Edge, case: str, tensor: tensor_pb2.TensorProto, fragment: str
) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["pixels"].CopyFrom(tensor)
    error = await _error(edge.tfs.Predict(request, metadata=(("x-request-id", "bad-1"),)))
    assert error.code() == INVALID
    assert "'pixels'" in error.details() and fragment in error.details()
    assert _trailing_id(error) == "bad-1"
    # Decoded after the version resolved: counted once, with that version.
    assert edge.stack.requests() == {("digits", "2", "tfserving_grpc", "INVALID_ARGUMENT"): 1}
    assert edge.no_inference()


async def test_predict_request_without_model_name_or_inputs(edge: Edge) -> None:
    error = await _error(edge.tfs.Predict(predict_pb2.PredictRequest()))
    assert error.code() == INVALID and "model_spec.name is required" in error.details()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    error = await _error(edge.tfs.Predict(request))
    assert error.code() == INVALID and "no inputs" in error.details()
    assert edge.stack.requests() == {
        ("", "", "tfserving_grpc", "INVALID_ARGUMENT"): 1,
        ("digits", "2", "tfserving_grpc", "INVALID_ARGUMENT"): 1,
    }


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (QueueFull("queue of model 'digits' version 2 is full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ModelNotReady("draining"), grpc.StatusCode.UNAVAILABLE),
        (ServingError("runtime failed", ErrorCode.PAYLOAD_TOO_LARGE), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ServingError("runtime failed", ErrorCode.UNSUPPORTED_MEDIA_TYPE), INVALID),
        (ServingError("runtime failed"), grpc.StatusCode.INTERNAL),
    ],
    ids=["queue full", "not ready", "too large", "media type", "internal"],
)
async def test_service_errors_from_the_runtime_map_to_status_codes(
    repo: Path, failure: ServingError, code: grpc.StatusCode
) -> None:
    # The batcher passes a runtime's ServiceError through unchanged: its code reaches the table.
    async with grpc_edge(repo, {("digits", 2): failing(failure)}) as edge:
        error = await _error(edge.tfs.Predict(_predict_request(), metadata=(("x-request-id", "r-9"),)))
        assert (error.code(), error.details(), _trailing_id(error)) == (code, failure.message, "r-9")
        error = await _error(edge.oip.ModelInfer(_infer_request(), metadata=(("x-request-id", "r-9"),)))
        assert (error.code(), error.details(), _trailing_id(error)) == (code, failure.message, "r-9")
        assert edge.stack.requests() == {
            ("digits", "2", "tfserving_grpc", failure.code.value): 1,
            ("digits", "2", "v2_grpc", failure.code.value): 1,
        }


async def test_a_runtime_error_is_internal(repo: Path) -> None:
    async with grpc_edge(repo, {("digits", 2): failing(RuntimeError("boom: the model exploded"))}) as edge:
        # One call at a time: a gRPC call starts when it is made, and two would share a batch.
        for call in (
            lambda: edge.tfs.Predict(_predict_request()),
            lambda: edge.oip.ModelInfer(_infer_request()),
        ):
            error = await _error(call())
            assert error.code() == grpc.StatusCode.INTERNAL
            assert error.details() == (
                "model 'digits' version 2 failed on a batch of 2 rows: RuntimeError: boom: the model exploded"
            )
        # Version 1 is untouched.
        assert (await edge.tfs.Predict(_predict_request(version=1))).outputs


async def test_a_full_queue_is_resource_exhausted(repo: Path) -> None:
    batching = {"max_batch_size": 2, "max_enqueued_batches": 1, "batch_timeout_micros": 0}
    async with grpc_edge(repo, {("digits", 2): GatedRuntime}, batching=batching) as edge:
        gate = edge.stack.factory.runtime("digits", 2)
        batcher = edge.stack.dataplane.registry.resolve("digits").batcher
        running = asyncio.ensure_future(edge.tfs.Predict(_predict_request()))
        try:
            await asyncio.to_thread(gate.started.wait, 10)
            waiting = asyncio.ensure_future(edge.oip.ModelInfer(_infer_request()))
            async with asyncio.timeout(10):
                while batcher.queued_rows < 2:
                    await asyncio.sleep(0)
            for call in (
                lambda: edge.tfs.Predict(_predict_request()),
                lambda: edge.oip.ModelInfer(_infer_request()),
            ):
                error = await _error(call())
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "queue of model 'digits' version 2 is full" in error.details()
        finally:
            gate.release.set()
        assert (await running).outputs and (await waiting).outputs
        assert edge.stack.count("digits", "2", "tfserving_grpc", "RESOURCE_EXHAUSTED") == 1
        assert edge.stack.count("digits", "2", "v2_grpc", "RESOURCE_EXHAUSTED") == 1


async def test_an_unexpected_exception_is_internal_and_the_server_keeps_serving(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The runtime answers a label no encoder can write: a bug past the data plane.
    async with grpc_edge(repo, {("digits", 2): UnencodableRuntime}) as edge:
        error = await _error(edge.tfs.Predict(_predict_request()))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "internal error in Predict" in error.details() and "secret" not in error.details()
        assert "unexpected error in gRPC Predict" in caplog.text
        error = await _error(edge.oip.ModelInfer(_infer_request()))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "internal error in ModelInfer" in error.details() and "secret" not in error.details()
        assert (await edge.tfs.Predict(_predict_request(version=1))).outputs


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("Classify", classification_pb2.ClassificationRequest()),
        ("Regress", regression_pb2.RegressionRequest()),
        ("MultiInference", inference_pb2.MultiInferenceRequest()),
    ],
)
async def test_classify_regress_multi_inference_are_unimplemented(
    edge: Edge, method: str, message: object
) -> None:
    error = await _error(getattr(edge.tfs, method)(message))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"{method} is not implemented" in error.details() and "Predict" in error.details()


async def test_get_model_metadata(edge: Edge) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    response = await edge.tfs.GetModelMetadata(request)
    assert response.model_spec.name == "digits" and response.model_spec.version.value == 2
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert [d.size for d in signature.inputs["pixels"].tensor_shape.dim] == [-1, 64]
    assert signature.outputs["label"].dtype == types_pb2.DT_STRING
    request.model_spec.version.value = 1
    assert (await edge.tfs.GetModelMetadata(request)).model_spec.version.value == 1
    request.model_spec.version_label = "stable"
    assert (await edge.tfs.GetModelMetadata(request)).model_spec.version.value == 1


async def test_get_model_metadata_errors(edge: Edge) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["labels"])
    request.model_spec.name = "digits"
    error = await _error(edge.tfs.GetModelMetadata(request))
    assert error.code() == INVALID and "'labels' is not supported" in error.details()
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "nope"
    error = await _error(edge.tfs.GetModelMetadata(request))
    assert error.code() == NOT_FOUND and "'nope'" in error.details()
    request.model_spec.name = "digits"
    request.model_spec.version.value = 3
    error = await _error(edge.tfs.GetModelMetadata(request))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "version 3 is FAILED" in error.details()


async def test_get_model_status(edge: Edge) -> None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "digits"
    response = await edge.models.GetModelStatus(request)
    states = get_model_status_pb2.ModelVersionStatus
    assert [(s.version, s.state) for s in response.model_version_status] == [
        (1, states.AVAILABLE),
        (2, states.AVAILABLE),
        (3, states.END),
    ]
    assert response.model_version_status[2].status.error_message == "ValueError: corrupt model file"
    request.model_spec.version.value = 2
    assert [s.version for s in (await edge.models.GetModelStatus(request)).model_version_status] == [2]
    request.model_spec.version_label = "stable"
    assert [s.version for s in (await edge.models.GetModelStatus(request)).model_version_status] == [1]
    request.model_spec.version.value = 7
    error = await _error(edge.models.GetModelStatus(request))
    assert error.code() == NOT_FOUND and "no version 7" in error.details()
    error = await _error(edge.models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest()))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- GRPCInferenceService ----------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
async def test_model_infer(edge: Edge, raw: bool) -> None:
    response, call = await _with_call(edge.oip.ModelInfer, _infer_request(raw=raw))
    assert (response.model_name, response.model_version) == ("digits", "2")
    outputs = _outputs(response)
    np.testing.assert_array_equal(outputs["probabilities"], digits_probabilities(_pixels()))
    assert outputs["label"].tolist() == [b"9", b"3"]
    assert FRESH_ID.fullmatch(response.id)
    assert dict(await call.trailing_metadata())["x-request-id"] == response.id
    (sent,) = edge.calls(2)
    np.testing.assert_array_equal(sent["pixels"], _pixels())
    assert edge.stack.requests() == {("digits", "2", "v2_grpc", "OK"): 1}


async def test_model_infer_ids_outputs_and_version(edge: Edge) -> None:
    request = _infer_request(id="oip-7", model_version="1")
    request.outputs.add(name="label")
    response, call = await _with_call(edge.oip.ModelInfer, request)
    assert response.id == "oip-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["label"]
    assert dict(await call.trailing_metadata())["x-request-id"] == "oip-7"
    response, call = await _with_call(edge.oip.ModelInfer, request, metadata=(("x-request-id", "hdr"),))
    assert response.id == "oip-7", "the OIP id is echoed even when the header differs"
    assert dict(await call.trailing_metadata())["x-request-id"] == "hdr"
    assert len(edge.calls(1)) == 2 and edge.calls(2) == []


def _oip_bad_requests() -> list[tuple[str, pb.ModelInferRequest, str, tuple[str, str]]]:
    shape_mismatch = _infer_request(raw=False)
    shape_mismatch.inputs[0].shape[:] = [3, 64]
    short_raw = _infer_request()
    short_raw.raw_input_contents[0] = b"\0" * 10
    bad_type = _infer_request()
    bad_type.inputs[0].datatype = "FP8"
    mixed = _infer_request()
    mixed.inputs[0].contents.fp32_contents.append(1.0)
    no_inputs = pb.ModelInferRequest(model_name="digits")
    decoded = ("digits", "2")  # decoding follows resolution: the version is known
    return [
        ("shape vs data", shape_mismatch, "needs 192 elements", decoded),
        ("raw length", short_raw, "raw content has 10 bytes", decoded),
        ("datatype", bad_type, "unsupported datatype 'FP8'", decoded),
        ("mixed", mixed, "no input may set contents", decoded),
        ("no inputs", no_inputs, "has no inputs", decoded),
        ("version", _infer_request(model_version="v1"), 'non-negative integer, got "v1"', ("digits", "")),
        ("no model", pb.ModelInferRequest(), "model_name is required", ("", "")),
    ]


@pytest.mark.parametrize(
    ("case", "message", "fragment", "labels"), _oip_bad_requests(), ids=[c[0] for c in _oip_bad_requests()]
)
async def test_model_infer_bad_requests_are_rejected_and_counted(
    edge: Edge, case: str, message: pb.ModelInferRequest, fragment: str, labels: tuple[str, str]
) -> None:
    error = await _error(edge.oip.ModelInfer(message))
    assert error.code() == INVALID and fragment in error.details(), error.details()
    assert edge.stack.requests() == {(*labels, "v2_grpc", "INVALID_ARGUMENT"): 1}
    assert edge.no_inference()


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"model_name": "nope"}, NOT_FOUND, "model 'nope' not found"),
        ({"model_version": "9"}, NOT_FOUND, "no loaded version 9"),
        ({"model_version": "3"}, grpc.StatusCode.UNAVAILABLE, "version 3 is FAILED"),
    ],
)
async def test_model_infer_resolution_errors(
    edge: Edge, fields: dict, code: grpc.StatusCode, fragment: str
) -> None:
    request = _infer_request()
    for key, value in fields.items():
        setattr(request, key, value)
    error = await _error(edge.oip.ModelInfer(request))
    assert error.code() == code and fragment in error.details()
    assert edge.no_inference()


async def test_model_infer_unknown_input_and_output(edge: Edge) -> None:
    request = _infer_request()
    request.inputs[0].name = "pixelz"
    error = await _error(edge.oip.ModelInfer(request))
    assert error.code() == INVALID and "unknown input 'pixelz'" in error.details()
    request = _infer_request()
    request.outputs.add(name="logits")
    error = await _error(edge.oip.ModelInfer(request))
    assert error.code() == INVALID and "unknown output 'logits'" in error.details()
    error = await _error(edge.oip.ModelInfer(_infer_request(_pixels()[:, :8])))
    assert error.code() == INVALID and "has 8 features" in error.details()
    assert edge.no_inference()


async def test_server_and_model_health_and_metadata(edge: Edge) -> None:
    oip = edge.oip
    assert (await oip.ServerLive(pb.ServerLiveRequest())).live
    assert (await oip.ServerReady(pb.ServerReadyRequest())).ready
    assert (await oip.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    assert (await oip.ModelReady(pb.ModelReadyRequest(name="digits", version="1"))).ready
    assert not (await oip.ModelReady(pb.ModelReadyRequest(name="digits", version="3"))).ready
    error = await _error(oip.ModelReady(pb.ModelReadyRequest(name="digits", version="7")))
    assert error.code() == NOT_FOUND and "no loaded version 7" in error.details()
    error = await _error(oip.ModelReady(pb.ModelReadyRequest(name="nope")))
    assert error.code() == NOT_FOUND
    error = await _error(oip.ModelReady(pb.ModelReadyRequest()))
    assert error.code() == INVALID and "name is required" in error.details()

    meta = await oip.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version, list(meta.extensions)) == (
        "modelloop",
        __version__,
        [
            "binary_tensor_data",
            "model_configuration",
            "statistics",
            "model_repository",
            "system_shared_memory",
        ],
    )
    model = await oip.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert (model.name, list(model.versions), model.platform) == ("digits", ["1", "2"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("pixels", "FP32", [-1, 64])]
    assert [(t.name, t.datatype) for t in model.outputs] == [("probabilities", "FP32"), ("label", "BYTES")]
    error = await _error(oip.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="x")))
    assert error.code() == INVALID and 'non-negative integer, got "x"' in error.details()
    error = await _error(oip.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
    assert error.code() == NOT_FOUND

    await edge.stack.dataplane.drain(grace_s=1)
    assert not (await oip.ServerReady(pb.ServerReadyRequest())).ready
    assert not (await oip.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    assert (await oip.ServerLive(pb.ServerLiveRequest())).live
    await edge.stack.dataplane.stop()
    assert not (await oip.ServerLive(pb.ServerLiveRequest())).live
    error = await _error(edge.tfs.Predict(_predict_request(), metadata=(("x-request-id", "late-1"),)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
    assert _trailing_id(error) == "late-1"


async def test_model_config_and_repository(edge: Edge) -> None:
    oip = edge.oip
    config = (await oip.ModelConfig(pb.ModelConfigRequest(name="digits", version="1"))).config
    assert (config.name, config.max_batch_size, config.input[0].name) == ("digits", 0, "pixels")
    assert list(config.input[0].dims) == [-1, 64] and config.output[1].data_type == pb.TYPE_STRING
    assert config.parameters["num_batch_threads"].string_value == "1"
    assert config.parameters["dynamic_batching"].string_value == "true"
    auth = (("authorization", f"Bearer {ADMIN}"),)
    # The index needs the admin token, as REST's does.
    error = await _error(oip.RepositoryIndex(pb.RepositoryIndexRequest()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    index = await oip.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=auth)
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("digits", "1", "AVAILABLE"),
        ("digits", "2", "AVAILABLE"),
        ("digits", "3", "FAILED"),
    ]
    assert index.models[2].reason == "ValueError: corrupt model file"
    ready = await oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=auth)
    assert [m.version for m in ready.models] == ["1", "2"]

    load = pb.RepositoryModelLoadRequest(model_name="digits")
    unload = pb.RepositoryModelUnloadRequest(model_name="digits")
    error = await _error(oip.RepositoryModelLoad(load))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in error.details()
    error = await _error(oip.RepositoryModelUnload(unload, metadata=(("authorization", "Bearer wrong"),)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await oip.ModelReady(pb.ModelReadyRequest(name="digits"))).ready  # refused: nothing changed

    first = edge.stack.factory.runtime("digits", 2)
    await oip.RepositoryModelUnload(unload, metadata=auth)
    assert first.unloaded
    assert not (await oip.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    error = await _error(oip.ModelInfer(_infer_request()))
    assert (
        error.code() == grpc.StatusCode.UNAVAILABLE and "unloaded through the repository" in error.details()
    )
    await oip.RepositoryModelLoad(load, metadata=auth)
    assert edge.stack.factory.runtime("digits", 2) is not first
    assert (await oip.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    assert (await oip.ModelInfer(_infer_request())).model_version == "2"
    error = await _error(
        oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), metadata=auth)
    )
    assert error.code() == NOT_FOUND
    error = await _error(oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(), metadata=auth))
    assert error.code() == INVALID and "model_name is required" in error.details()


async def test_model_statistics(edge: Edge) -> None:
    oip = edge.oip
    await oip.ModelInfer(_infer_request(_pixels(3), model_version="1"))
    bad = await _error(oip.ModelInfer(_infer_request(np.zeros((1, 3), np.float32), model_version="1")))
    assert bad.code() == INVALID
    every = await oip.ModelStatistics(pb.ModelStatisticsRequest())
    assert [(s.name, s.version) for s in every.model_stats] == [("digits", "1"), ("digits", "2")]
    [one] = (await oip.ModelStatistics(pb.ModelStatisticsRequest(name="digits", version="1"))).model_stats
    assert (one.inference_count, one.execution_count) == (3, 1)
    stats = one.inference_stats
    assert (stats.success.count, stats.fail.count, stats.compute_infer.count) == (1, 1, 1)
    assert stats.success.ns >= stats.compute_infer.ns > 0 and one.last_inference > 0
    assert [(b.batch_size, b.compute_infer.count) for b in one.batch_stats] == [(3, 1)]
    two = (await oip.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))).model_stats
    assert [s.version for s in two] == ["1", "2"] and two[1].inference_count == 0

    error = await _error(oip.ModelStatistics(pb.ModelStatisticsRequest(name="nope")))
    assert error.code() == NOT_FOUND and "'nope'" in error.details()
    error = await _error(oip.ModelStatistics(pb.ModelStatisticsRequest(name="digits", version="7")))
    assert error.code() == NOT_FOUND
    error = await _error(oip.ModelStatistics(pb.ModelStatisticsRequest(version="1")))
    assert error.code() == INVALID and "must name the model" in error.details()


async def test_repository_load_is_off_without_an_admin_token(repo: Path) -> None:
    async with grpc_edge(repo, admin_token=None) as edge:
        built = len(edge.stack.factory.built)
        # Off: PERMISSION_DENIED, as REST answers 403 (one check for both, tokens.authorize_admin).
        error = await _error(edge.oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits")))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "MODELLOOP_ADMIN_TOKEN" in error.details()
        error = await _error(
            edge.oip.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"))
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(edge.stack.factory.built) == built
        assert (await edge.oip.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
        meta = await edge.oip.ServerMetadata(pb.ServerMetadataRequest())
        assert list(meta.extensions) == ["binary_tensor_data", "model_configuration", "statistics"]


async def test_unregistered_triton_rpcs_answer_unimplemented(edge: Edge) -> None:
    trace = edge.channel.unary_unary(
        "/inference.GRPCInferenceService/TraceSetting",
        request_serializer=lambda _: b"",
        response_deserializer=lambda data: data,
    )
    error = await _error(trace(None))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- what every inference call shares ------------------------------------------------------


@pytest.mark.parametrize("version", ["²", "-1", "1e3", "+1", " 1"])
async def test_a_version_that_is_not_ascii_digits_is_invalid_argument(edge: Edge, version: str) -> None:
    message = f'model version must be a non-negative integer, got "{version}"'
    calls = [
        edge.oip.ModelInfer(_infer_request(model_version=version)),
        edge.oip.ModelReady(pb.ModelReadyRequest(name="digits", version=version)),
        edge.oip.ModelMetadata(pb.ModelMetadataRequest(name="digits", version=version)),
        edge.oip.ModelConfig(pb.ModelConfigRequest(name="digits", version=version)),
    ]
    for call in calls:
        error = await _error(call)
        assert (error.code(), error.details()) == (INVALID, message)
    assert edge.stack.requests() == {("digits", "", "v2_grpc", "INVALID_ARGUMENT"): 1}
    assert edge.no_inference()


async def test_a_negative_predict_version_is_invalid_argument(edge: Edge) -> None:
    error = await _error(edge.tfs.Predict(_predict_request(version=-1)))
    assert (error.code(), error.details()) == (
        INVALID,
        'model version must be a non-negative integer, got "-1"',
    )
    assert edge.stack.requests() == {("digits", "", "tfserving_grpc", "INVALID_ARGUMENT"): 1}


@pytest.mark.parametrize("bad", ["x" * 129, "x" * 200], ids=["129 chars", "200 chars"])
async def test_an_invalid_client_id_is_replaced_by_a_fresh_one(edge: Edge, bad: str) -> None:
    metadata = (("x-request-id", bad),)
    _, call = await _with_call(edge.tfs.Predict, _predict_request(), metadata=metadata)
    assert FRESH_ID.fullmatch(dict(await call.trailing_metadata())["x-request-id"])
    response, call = await _with_call(edge.oip.ModelInfer, _infer_request(), metadata=metadata)
    assert FRESH_ID.fullmatch(dict(await call.trailing_metadata())["x-request-id"]) and response.id
    # The OIP id field follows the same rule; the response still echoes what was sent.
    for bad_id in (bad, "tab\there"):
        response, call = await _with_call(edge.oip.ModelInfer, _infer_request(id=bad_id))
        assert FRESH_ID.fullmatch(dict(await call.trailing_metadata())["x-request-id"])
        assert response.id == bad_id
    error = await _error(edge.tfs.Predict(_predict_request(name="nope"), metadata=metadata))
    assert FRESH_ID.fullmatch(_trailing_id(error) or "")
    error = await _error(edge.oip.ModelInfer(_infer_request(_pixels()[:, :3]), metadata=metadata))
    assert FRESH_ID.fullmatch(_trailing_id(error) or "")


async def test_a_client_id_comes_back_on_every_failed_call(edge: Edge) -> None:
    metadata = (("x-request-id", "mine-7"),)
    no_inputs = predict_pb2.PredictRequest()
    no_inputs.model_spec.name = "digits"
    bad_raw = _infer_request()
    bad_raw.raw_input_contents[0] = b"\0"
    calls = [
        edge.tfs.Predict(_predict_request(name="nope"), metadata=metadata),
        edge.tfs.Predict(_predict_request(version=-1), metadata=metadata),
        edge.tfs.Predict(predict_pb2.PredictRequest(), metadata=metadata),
        edge.tfs.Predict(no_inputs, metadata=metadata),
        edge.tfs.Predict(_predict_request(_pixels()[:, :3]), metadata=metadata),
        edge.oip.ModelInfer(_infer_request(model_version="²"), metadata=metadata),
        edge.oip.ModelInfer(pb.ModelInferRequest(), metadata=metadata),
        edge.oip.ModelInfer(bad_raw, metadata=metadata),
        edge.oip.ModelInfer(_infer_request(model_version="3"), metadata=metadata),
    ]
    for call in calls:
        assert _trailing_id(await _error(call)) == "mine-7"
    # Without a client id, a failed call still names the fresh id it was given.
    assert FRESH_ID.fullmatch(_trailing_id(await _error(edge.oip.ModelInfer(pb.ModelInferRequest()))) or "")


# --- health, reflection, sizes, binding -------------------------------------------------


def _break_the_repository(repo: Path) -> Path:
    """Adds a model whose one version cannot load: the server is then not ready."""
    return write_version(repo, "broken", 1, [], [])  # a model.json with no inputs: FAILED


async def test_health_follows_readiness_and_draining(repo: Path) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    async with grpc_edge(repo, start=False) as edge:
        health = edge.health
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == not_serving  # still starting
        await edge.stack.dataplane.start()
        for service in ("", "tensorflow.serving.PredictionService", "inference.GRPCInferenceService"):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == serving
        _break_the_repository(repo)
        await edge.stack.dataplane.registry.poll()
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == not_serving
        assert not (await edge.oip.ServerReady(pb.ServerReadyRequest())).ready
        error = await _error(health.Check(health_pb2.HealthCheckRequest(service="nope.Service")))
        assert error.code() == NOT_FOUND
        listed = await health.List(health_pb2.HealthListRequest())
        assert set(listed.statuses) == {
            "",
            "tensorflow.serving.PredictionService",
            "tensorflow.serving.ModelService",
            "inference.GRPCInferenceService",
        }
        assert {s.status for s in listed.statuses.values()} == {not_serving}


async def test_health_watch_streams_changes(repo: Path) -> None:
    async with grpc_edge(repo) as edge:
        stream = edge.health.Watch(health_pb2.HealthCheckRequest())
        assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVING
        unknown = edge.health.Watch(health_pb2.HealthCheckRequest(service="nope"))
        assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        broken = _break_the_repository(repo)
        await edge.stack.dataplane.registry.poll()
        assert (await stream.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        for path in (broken / "model.json", broken, broken.parent):
            path.unlink() if path.is_file() else path.rmdir()
        await edge.stack.dataplane.registry.poll()
        assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVING
        # Draining: NOT_SERVING, then both streams end so they cannot hold up a graceful stop.
        await edge.stack.dataplane.drain(grace_s=1)
        assert (await stream.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await stream.read() is grpc.aio.EOF
        assert await unknown.read() is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK


async def test_reflection_lists_every_service(edge: Edge) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(edge.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")

    responses = [r async for r in stub.ServerReflectionInfo(requests())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert responses[1].file_descriptor_response.file_descriptor_proto


async def test_messages_over_4_mib_pass_and_over_the_limit_are_resource_exhausted(edge: Edge) -> None:
    pixels = np.ones((BIG_ROWS, 64), dtype=np.float32)
    assert pixels.nbytes > 4 * MIB
    response = await edge.tfs.Predict(_predict_request(pixels))
    assert tensor_util.MakeNdarray(response.outputs["probabilities"]).shape == (BIG_ROWS, 10)
    response = await edge.oip.ModelInfer(_infer_request(pixels))
    assert _outputs(response)["probabilities"].shape == (BIG_ROWS, 10)
    too_big = np.ones((70_000, 64), dtype=np.float32)  # 17.9 MB > 16 MiB
    error = await _error(edge.tfs.Predict(_predict_request(too_big)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [len(call["pixels"]) for call in edge.calls(2)] == [BIG_ROWS, BIG_ROWS]


async def test_bind_reports_the_port_and_refuses_a_taken_one(edge: Edge) -> None:
    assert edge.port > 0
    second = create_grpc_server(edge.stack.dataplane, edge.stack.settings)
    with pytest.raises(OSError, match=f"127.0.0.1:{edge.port}"):
        bind_grpc_server(second, "127.0.0.1", edge.port)
    await second.stop(None)


def test_every_error_code_has_a_status() -> None:
    for code in ErrorCode:
        assert code in grpc_errors.STATUS_CODES
    assert grpc_errors.status_code(InvalidInput("x").code) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_errors.status_code(Unimplemented("x").code) == grpc.StatusCode.UNIMPLEMENTED
