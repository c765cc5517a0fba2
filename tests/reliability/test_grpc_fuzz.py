"""Hypothesis-generated gRPC requests against a real server: client errors only, never a crash.

The strategies cover every dtype, shapes that do and do not fit the model, and contents
that lie about their size (tensor_content length or *_val count against the shape,
OIP raw bytes against shape x datatype).
"""

from __future__ import annotations

from collections import Counter

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc

CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
TF_DTYPES = [1, 2, 3, 4, 5, 6, 7, 9, 10, 17, 19, 22, 23, 14, 0, 99]
OIP_DTYPES = [
    "FP32",
    "FP64",
    "FP16",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT64",
    "BOOL",
    "BYTES",
    "BF16",
    "NOPE",
    "",
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)

dims = st.lists(st.sampled_from([-1, 0, 1, 2, 3, 63, 64, 65, 1 << 40]), min_size=0, max_size=4)
names = st.sampled_from(["pixels", "probabilities", "", "nope", "../pixels"])
models = st.sampled_from(["digits", "digits", "nope", "", "../digits"])


@st.composite
def predict_requests(draw):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = draw(models)
    if draw(st.booleans()):
        request.model_spec.version.value = draw(st.sampled_from([1, 2, 0, -5]))
    request.model_spec.signature_name = draw(st.sampled_from(["", "serving_default", "other"]))
    for _ in range(draw(st.integers(0, 2))):
        shape = tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in draw(dims)],
            unknown_rank=draw(st.booleans()) and draw(st.booleans()),
        )
        tensor = tensor_pb2.TensorProto(dtype=draw(st.sampled_from(TF_DTYPES)), tensor_shape=shape)
        kind = draw(st.sampled_from(["content", "float", "int", "string", "bool", "none"]))
        if kind == "content":
            tensor.tensor_content = draw(st.binary(max_size=600))
        elif kind == "float":
            tensor.float_val.extend(draw(st.lists(st.floats(width=32), max_size=130)))
        elif kind == "int":
            tensor.int64_val.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=70)))
        elif kind == "string":
            tensor.string_val.extend(draw(st.lists(st.binary(max_size=8), max_size=5)))
        elif kind == "bool":
            tensor.bool_val.extend(draw(st.lists(st.booleans(), max_size=70)))
        request.inputs[draw(names)].CopyFrom(tensor)
    request.output_filter.extend(draw(st.lists(names, max_size=2)))
    return request


@st.composite
def infer_requests(draw):
    request = oip.ModelInferRequest(
        model_name=draw(models), model_version=draw(st.sampled_from(["", "1", "x", "9"]))
    )
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(names),
            datatype=draw(st.sampled_from(OIP_DTYPES)),
            shape=draw(st.lists(st.sampled_from([-1, 0, 1, 2, 64, 65, 1 << 40]), max_size=3)),
        )
        if use_raw:
            request.raw_input_contents.append(draw(st.binary(max_size=600)))
        elif draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=130)))
        else:
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=3)))
    if draw(st.booleans()):
        request.outputs.add(name=draw(names))
    return request


@st.composite
def valid_predict_requests(draw):
    """Well-formed requests with random values, so the fuzz also reaches the model."""
    import numpy as np
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
    from tensorflow_serving.apis import predict_pb2

    rows = draw(st.integers(1, 4))
    values = np.array(draw(st.lists(st.floats(0, 16, width=32), min_size=rows * 64, max_size=rows * 64)))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in (rows, 64)]
    )
    request.inputs["pixels"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=1, tensor_shape=shape, tensor_content=values.astype(np.float32).tobytes()
        )
    )
    return request


@st.composite
def valid_infer_requests(draw):
    rows = draw(st.integers(1, 4))
    request = oip.ModelInferRequest(model_name="digits", model_version=draw(st.sampled_from(["", "1"])))
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[rows, 64])
    tensor.contents.fp32_contents.extend(
        draw(st.lists(st.floats(0, 16, width=32), min_size=rows * 64, max_size=rows * 64))
    )
    return request


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def test_fuzzed_predict_requests_get_client_errors(channel, server):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    seen: Counter[str] = Counter()

    @SETTINGS
    @given(request=st.one_of(valid_predict_requests(), predict_requests()))
    def exercise(request) -> None:
        try:
            stub.Predict(request, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            assert error.details(), "every error names its problem"
        seen[code.name] += 1
        assert code in CLIENT_CODES, f"{code}: {request}"

    exercise()
    print(f"\nPredict fuzz: {sum(seen.values())} requests, {dict(seen)}")
    assert sum(seen.values()) >= 100
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0
    assert httpx.get(f"{server.rest_url}/v2/health/ready", timeout=5).status_code == 200


def test_fuzzed_model_infer_requests_get_client_errors(channel, server):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    seen: Counter[str] = Counter()

    @SETTINGS
    @given(request=st.one_of(valid_infer_requests(), infer_requests()))
    def exercise(request) -> None:
        try:
            stub.ModelInfer(request, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            assert error.details()
        seen[code.name] += 1
        assert code in CLIENT_CODES, f"{code}: {request}"

    exercise()
    print(f"\nModelInfer fuzz: {sum(seen.values())} requests, {dict(seen)}")
    assert sum(seen.values()) >= 100
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0
    assert httpx.get(f"{server.rest_url}/v2/health/ready", timeout=5).status_code == 200
