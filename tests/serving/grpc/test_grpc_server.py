"""The gRPC edge over a FakeDataPlane: every service, the request id, every error branch."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import numpy as np
import pytest
from fakes_grpc import FakeDataPlane, fake_probabilities, internal, queue_full
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

from modelloop.serving.errors import (
    ErrorCode,
    InvalidInput,
    ModelNotReady,
    ServingError,
    Unimplemented,
)
from modelloop.serving.grpc import errors as grpc_errors
from modelloop.serving.grpc.server import bind_grpc_server, create_grpc_server
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc
from modelloop.serving.settings import ServingSettings
from modelloop.serving.types import Protocol

MIB = 1024 * 1024
ADMIN = "s3cret"


def _pixels(rows: int = 2) -> np.ndarray:
    return (np.arange(rows * 64, dtype=np.float32).reshape(rows, 64) % 17).astype(np.float32)


@pytest.fixture
def dataplane() -> FakeDataPlane:
    return FakeDataPlane()


@pytest.fixture
def settings(tmp_path: Path) -> ServingSettings:
    return ServingSettings(repo=tmp_path, grpc_port=0, admin_token=ADMIN, grpc_max_message_bytes=16 * MIB)


@pytest.fixture
async def port(dataplane: FakeDataPlane, settings: ServingSettings) -> AsyncIterator[int]:
    server = create_grpc_server(dataplane, settings)
    bound = bind_grpc_server(server, "127.0.0.1", 0)
    await server.start()
    yield bound
    await server.stop(None)


@pytest.fixture
async def channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        yield channel


@pytest.fixture
def tfs(channel: grpc.aio.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture
def oip(channel: grpc.aio.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


async def _error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


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


# --- PredictionService -------------------------------------------------------------------


async def test_predict_with_tensor_content(tfs, dataplane: FakeDataPlane) -> None:
    request = _predict_request()
    assert request.inputs["pixels"].tensor_content
    response, call = await _with_call(tfs.Predict, request)
    probabilities = tensor_util.MakeNdarray(response.outputs["probabilities"])
    np.testing.assert_allclose(probabilities, fake_probabilities(_pixels()), rtol=1e-6)
    assert response.model_spec.name == "digits"
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    assert tensor_util.MakeNdarray(response.outputs["label"]).shape == (2,)
    metadata = dict(await call.initial_metadata())
    assert metadata["x-request-id"] == "generated-1"
    assert dataplane.requests[0].protocol is Protocol.TFSERVING_GRPC


async def test_predict_with_float_val_version_label_and_output_filter(tfs, dataplane: FakeDataPlane) -> None:
    request = _predict_request(version_label="stable", signature_name="serving_default")
    tensor = request.inputs["pixels"]
    tensor.ClearField("tensor_content")
    tensor.float_val.extend(_pixels().reshape(-1).tolist())
    request.output_filter.append("probabilities")
    response, call = await _with_call(tfs.Predict, request, metadata=(("x-request-id", "client-42"),))
    assert list(response.outputs) == ["probabilities"]
    assert response.model_spec.version.value == 1
    assert dict(await call.initial_metadata())["x-request-id"] == "client-42"
    sent = dataplane.requests[-1]
    assert (sent.label, sent.id, sent.outputs) == ("stable", "client-42", ["probabilities"])
    np.testing.assert_array_equal(sent.inputs["pixels"], _pixels())


@pytest.mark.parametrize(
    ("spec", "code", "fragment"),
    [
        ({"name": "nope"}, grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        ({"version": 9}, grpc.StatusCode.NOT_FOUND, "no version 9"),
        ({"version_label": "canary"}, grpc.StatusCode.NOT_FOUND, "no version label 'canary'"),
        ({"signature_name": "classify"}, grpc.StatusCode.NOT_FOUND, "no signature 'classify'"),
        ({"version": 3}, grpc.StatusCode.UNAVAILABLE, "version 3 is FAILED"),
    ],
)
async def test_predict_resolution_errors(tfs, spec: dict, code: grpc.StatusCode, fragment: str) -> None:
    error = await _error(tfs.Predict(_predict_request(**spec)))
    assert error.code() == code
    assert fragment in error.details()


async def test_predict_unknown_input_and_output(tfs) -> None:
    request = _predict_request()
    request.inputs["pixelz"].CopyFrom(request.inputs["pixels"])
    error = await _error(tfs.Predict(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown input 'pixelz'" in error.details()
    request = _predict_request()
    request.output_filter.append("logits")
    error = await _error(tfs.Predict(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 'logits'" in error.details()


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
    tfs, dataplane: FakeDataPlane, case: str, tensor: tensor_pb2.TensorProto, fragment: str
) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["pixels"].CopyFrom(tensor)
    error = await _error(tfs.Predict(request, metadata=(("x-request-id", "bad-1"),)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'pixels'" in error.details() and fragment in error.details()
    assert ("x-request-id", "bad-1") in tuple(error.trailing_metadata())
    assert dataplane.rejected == [("digits", Protocol.TFSERVING_GRPC, ErrorCode.INVALID_ARGUMENT)]
    assert dataplane.requests == []


async def test_predict_request_without_model_name_or_inputs(tfs, dataplane: FakeDataPlane) -> None:
    error = await _error(tfs.Predict(predict_pb2.PredictRequest()))
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_spec.name is required" in error.details()
    )
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    error = await _error(tfs.Predict(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "no inputs" in error.details()
    assert len(dataplane.rejected) == 2


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (queue_full(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ModelNotReady("draining"), grpc.StatusCode.UNAVAILABLE),
        (internal(ErrorCode.PAYLOAD_TOO_LARGE), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (internal(ErrorCode.UNSUPPORTED_MEDIA_TYPE), grpc.StatusCode.INVALID_ARGUMENT),
        (internal(), grpc.StatusCode.INTERNAL),
    ],
)
async def test_data_plane_errors_map_to_status_codes(
    tfs, oip, dataplane: FakeDataPlane, failure: ServingError, code: grpc.StatusCode
) -> None:
    dataplane.fail_with = failure
    error = await _error(tfs.Predict(_predict_request()))
    assert (error.code(), error.details()) == (code, failure.message)
    error = await _error(oip.ModelInfer(_infer_request()))
    assert (error.code(), error.details()) == (code, failure.message)


async def test_an_unexpected_exception_is_internal_and_the_server_keeps_serving(
    tfs, dataplane: FakeDataPlane, caplog: pytest.LogCaptureFixture
) -> None:
    dataplane.fail_with = ZeroDivisionError("secret detail")
    error = await _error(tfs.Predict(_predict_request()))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "internal error in Predict" in error.details() and "secret" not in error.details()
    assert "unexpected error in gRPC Predict" in caplog.text
    dataplane.fail_with = None
    assert (await tfs.Predict(_predict_request())).outputs


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("Classify", classification_pb2.ClassificationRequest()),
        ("Regress", regression_pb2.RegressionRequest()),
        ("MultiInference", inference_pb2.MultiInferenceRequest()),
    ],
)
async def test_classify_regress_multi_inference_are_unimplemented(tfs, method: str, message: object) -> None:
    error = await _error(getattr(tfs, method)(message))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"{method} is not implemented" in error.details() and "Predict" in error.details()


async def test_get_model_metadata(tfs) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    response = await tfs.GetModelMetadata(request)
    assert response.model_spec.name == "digits" and response.model_spec.version.value == 2
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert [d.size for d in signature.inputs["pixels"].tensor_shape.dim] == [-1, 64]
    assert signature.outputs["label"].dtype == types_pb2.DT_STRING
    request.model_spec.version.value = 1
    assert (await tfs.GetModelMetadata(request)).model_spec.version.value == 1


async def test_get_model_metadata_errors(tfs) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["labels"])
    request.model_spec.name = "digits"
    error = await _error(tfs.GetModelMetadata(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'labels' is not supported" in error.details()
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "nope"
    error = await _error(tfs.GetModelMetadata(request))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in error.details()


async def test_get_model_status(channel: grpc.aio.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "digits"
    response = await stub.GetModelStatus(request)
    states = get_model_status_pb2.ModelVersionStatus
    assert [(s.version, s.state) for s in response.model_version_status] == [
        (1, states.AVAILABLE),
        (2, states.AVAILABLE),
        (3, states.END),
    ]
    assert response.model_version_status[2].status.error_message == "corrupt model.onnx"
    request.model_spec.version.value = 2
    assert [s.version for s in (await stub.GetModelStatus(request)).model_version_status] == [2]
    request.model_spec.version.value = 7
    error = await _error(stub.GetModelStatus(request))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no version 7" in error.details()
    error = await _error(stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest()))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- GRPCInferenceService ----------------------------------------------------------------


def _infer_request(
    pixels: np.ndarray | None = None, raw: bool = True, **fields: object
) -> pb.ModelInferRequest:
    pixels = _pixels() if pixels is None else pixels
    request = pb.ModelInferRequest(model_name="digits", **fields)
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=pixels.shape)
    if raw:
        request.raw_input_contents.append(pixels.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(pixels.reshape(-1).tolist())
    return request


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


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
async def test_model_infer(oip, dataplane: FakeDataPlane, raw: bool) -> None:
    response, call = await _with_call(oip.ModelInfer, _infer_request(raw=raw))
    assert (response.model_name, response.model_version) == ("digits", "2")
    outputs = _outputs(response)
    np.testing.assert_allclose(outputs["probabilities"], fake_probabilities(_pixels()), rtol=1e-6)
    assert outputs["label"].shape == (2,)
    assert response.parameters["served_by"].string_param == "fake"
    assert response.id == "generated-1"
    assert dict(await call.initial_metadata())["x-request-id"] == "generated-1"
    assert dataplane.requests[0].protocol is Protocol.V2_GRPC


async def test_model_infer_ids_outputs_and_version(oip, dataplane: FakeDataPlane) -> None:
    request = _infer_request(id="oip-7", model_version="1")
    request.outputs.add(name="label")
    response, call = await _with_call(oip.ModelInfer, request)
    assert response.id == "oip-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["label"]
    assert dict(await call.initial_metadata())["x-request-id"] == "oip-7"
    response, call = await _with_call(oip.ModelInfer, request, metadata=(("x-request-id", "hdr"),))
    assert response.id == "oip-7", "the OIP id is echoed even when the header differs"
    assert dict(await call.initial_metadata())["x-request-id"] == "hdr"
    assert dataplane.requests[-1].id == "hdr"


def _oip_bad_requests() -> list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]]:
    shape_mismatch = _infer_request(raw=False)
    shape_mismatch.inputs[0].shape[:] = [3, 64]
    short_raw = _infer_request()
    short_raw.raw_input_contents[0] = b"\0" * 10
    bad_type = _infer_request()
    bad_type.inputs[0].datatype = "FP8"
    mixed = _infer_request()
    mixed.inputs[0].contents.fp32_contents.append(1.0)
    return [
        ("shape vs data", shape_mismatch, grpc.StatusCode.INVALID_ARGUMENT, "needs 192 elements"),
        ("raw length", short_raw, grpc.StatusCode.INVALID_ARGUMENT, "raw content has 10 bytes"),
        ("datatype", bad_type, grpc.StatusCode.INVALID_ARGUMENT, "unsupported datatype 'FP8'"),
        ("mixed", mixed, grpc.StatusCode.INVALID_ARGUMENT, "no input may set contents"),
        ("version", _infer_request(model_version="v1"), grpc.StatusCode.INVALID_ARGUMENT, "not an integer"),
        ("no model", pb.ModelInferRequest(), grpc.StatusCode.INVALID_ARGUMENT, "model_name is required"),
    ]


@pytest.mark.parametrize(
    ("case", "message", "code", "fragment"), _oip_bad_requests(), ids=[c[0] for c in _oip_bad_requests()]
)
async def test_model_infer_bad_requests_are_rejected_and_counted(
    oip,
    dataplane: FakeDataPlane,
    case: str,
    message: pb.ModelInferRequest,
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    error = await _error(oip.ModelInfer(message))
    assert error.code() == code and fragment in error.details()
    assert dataplane.rejected == [(message.model_name, Protocol.V2_GRPC, ErrorCode.INVALID_ARGUMENT)]
    assert dataplane.requests == []


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"model_name": "nope"}, grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        ({"model_version": "9"}, grpc.StatusCode.NOT_FOUND, "no version 9"),
    ],
)
async def test_model_infer_resolution_errors(oip, fields: dict, code: grpc.StatusCode, fragment: str) -> None:
    request = _infer_request()
    for key, value in fields.items():
        setattr(request, key, value)
    error = await _error(oip.ModelInfer(request))
    assert error.code() == code and fragment in error.details()


async def test_model_infer_unknown_input_and_output(oip) -> None:
    request = _infer_request()
    request.inputs[0].name = "pixelz"
    error = await _error(oip.ModelInfer(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown input 'pixelz'" in error.details()
    request = _infer_request()
    request.outputs.add(name="logits")
    error = await _error(oip.ModelInfer(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 'logits'" in error.details()


async def test_server_and_model_health_and_metadata(oip, dataplane: FakeDataPlane) -> None:
    assert (await oip.ServerLive(pb.ServerLiveRequest())).live
    assert (await oip.ServerReady(pb.ServerReadyRequest())).ready
    assert (await oip.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    assert not (await oip.ModelReady(pb.ModelReadyRequest(name="digits", version="3"))).ready
    error = await _error(oip.ModelReady(pb.ModelReadyRequest(name="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await _error(oip.ModelReady(pb.ModelReadyRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "name is required" in error.details()
    dataplane.draining = True
    assert not (await oip.ServerReady(pb.ServerReadyRequest())).ready

    meta = await oip.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version, list(meta.extensions)) == ("modelloop", "0.1.0", ["model_repository"])
    model = await oip.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert (model.name, list(model.versions), model.platform) == ("digits", ["1", "2"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("pixels", "FP32", [-1, 64])]
    assert [(t.name, t.datatype) for t in model.outputs] == [("probabilities", "FP32"), ("label", "BYTES")]
    error = await _error(oip.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="x")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'x' is not an integer" in error.details()
    error = await _error(oip.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_model_config_and_repository(oip, dataplane: FakeDataPlane) -> None:
    config = (await oip.ModelConfig(pb.ModelConfigRequest(name="digits", version="1"))).config
    assert (config.name, config.max_batch_size, config.input[0].name) == ("digits", 0, "pixels")
    assert list(config.input[0].dims) == [-1, 64] and config.output[1].data_type == pb.TYPE_STRING
    index = await oip.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.version, m.state) for m in index.models] == [
        ("1", "READY"),
        ("2", "READY"),
        ("3", "UNAVAILABLE"),
    ]
    ready = await oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [m.version for m in ready.models] == ["1", "2"]

    load = pb.RepositoryModelLoadRequest(model_name="digits")
    unload = pb.RepositoryModelUnloadRequest(model_name="digits")
    error = await _error(oip.RepositoryModelLoad(load))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in error.details()
    error = await _error(oip.RepositoryModelUnload(unload, metadata=(("authorization", "Bearer wrong"),)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    auth = (("authorization", f"Bearer {ADMIN}"),)
    await oip.RepositoryModelLoad(load, metadata=auth)
    await oip.RepositoryModelUnload(unload, metadata=auth)
    assert (dataplane.loaded, dataplane.unloaded) == (["digits"], ["digits"])
    error = await _error(
        oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), metadata=auth)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await _error(oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(), metadata=auth))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_name is required" in error.details()


async def test_repository_load_is_off_without_an_admin_token(
    tmp_path: Path, dataplane: FakeDataPlane
) -> None:
    server = create_grpc_server(dataplane, ServingSettings(repo=tmp_path))
    port = bind_grpc_server(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            error = await _error(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits")))
            assert (
                error.code() == grpc.StatusCode.UNIMPLEMENTED and "MODELLOOP_ADMIN_TOKEN" in error.details()
            )
    finally:
        await server.stop(None)
    assert dataplane.loaded == []


async def test_unregistered_triton_rpcs_answer_unimplemented(channel: grpc.aio.Channel) -> None:
    stats = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelStatistics",
        request_serializer=lambda _: b"",
        response_deserializer=lambda data: data,
    )
    error = await _error(stats(None))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- health, reflection, sizes, binding -------------------------------------------------


async def test_health_follows_readiness_and_draining(
    channel: grpc.aio.Channel, dataplane: FakeDataPlane
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", "tensorflow.serving.PredictionService", "inference.GRPCInferenceService"):
        assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == serving
    dataplane.draining = True
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == not_serving
    dataplane.draining, dataplane.is_ready = False, False
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == not_serving
    error = await _error(health.Check(health_pb2.HealthCheckRequest(service="nope.Service")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    listed = await health.List(health_pb2.HealthListRequest())
    assert set(listed.statuses) == {
        "",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "inference.GRPCInferenceService",
    }


async def test_health_watch_streams_changes(channel: grpc.aio.Channel, dataplane: FakeDataPlane) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    stream = health.Watch(health_pb2.HealthCheckRequest())
    assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVING
    unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"))
    assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    dataplane.is_ready = False
    assert (await stream.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    dataplane.is_ready = True
    assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVING
    # Draining: NOT_SERVING, then both streams end so they cannot hold up a graceful stop.
    dataplane.draining = True
    assert (await stream.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await stream.read() is grpc.aio.EOF
    assert await unknown.read() is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK


async def test_reflection_lists_every_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

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


async def test_messages_over_4_mib_pass_and_over_the_limit_are_resource_exhausted(tfs, oip) -> None:
    big = np.ones((5000, 64), dtype=np.float32)  # 1.28 MB of floats; float_val makes it ~1.6 MB
    rows = 20_000  # 5.1 MB in tensor_content: over gRPC's 4 MiB default, under our 16 MiB limit
    pixels = np.ones((rows, 64), dtype=np.float32)
    response = await tfs.Predict(_predict_request(pixels))
    assert tensor_util.MakeNdarray(response.outputs["probabilities"]).shape == (rows, 10)
    response = await oip.ModelInfer(_infer_request(pixels))
    assert _outputs(response)["probabilities"].shape == (rows, 10)
    assert big.nbytes < 4 * MIB < pixels.nbytes
    too_big = np.ones((70_000, 64), dtype=np.float32)  # 17.9 MB > 16 MiB
    error = await _error(tfs.Predict(_predict_request(too_big)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_bind_reports_the_port_and_refuses_a_taken_one(
    dataplane: FakeDataPlane, settings: ServingSettings, port: int
) -> None:
    assert port > 0
    second = create_grpc_server(dataplane, settings)
    with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
        bind_grpc_server(second, "127.0.0.1", port)
    await second.stop(None)


def test_every_error_code_has_a_status() -> None:
    for code in ErrorCode:
        assert code in grpc_errors.STATUS_CODES
    assert grpc_errors.status_code(InvalidInput("x").code) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_errors.status_code(Unimplemented("x").code) == grpc.StatusCode.UNIMPLEMENTED
