"""Hypothesis fuzz of every decoding codec: anything a client sends either decodes or
raises a ServingError with a client-error code. No other exception escapes."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelloop.errors import ErrorCode
from modelloop.serving.codecs import binary_tensor, tensor_proto, tfserving_json, v2_grpc, v2_json
from modelloop.serving.errors import ServingError
from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.types import ModelMetadata, TensorSpec

CLIENT = {
    ErrorCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND,
    ErrorCode.UNIMPLEMENTED,
    ErrorCode.PAYLOAD_TOO_LARGE,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ErrorCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
METADATA = ModelMetadata(
    name="digits",
    version=1,
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("pixels", np.dtype("float32"), (-1, 64)),),
    outputs=(TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),),
)

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.fixed_dictionaries({"b64": st.text(max_size=8)}),
)
json_values = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "instances",
                    "inputs",
                    "pixels",
                    "signature_name",
                    "name",
                    "shape",
                    "datatype",
                    "data",
                    "parameters",
                    "outputs",
                    "id",
                    "binary_data_size",
                    "binary_data",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=40,
)


def _client_error_only(call) -> str:
    try:
        call()
    except ServingError as error:
        assert error.code in CLIENT, (error.code, error.message)
        assert error.message
        return error.code.value
    return "OK"


@FUZZ
@given(document=json_values, raw=st.binary(max_size=200), use_raw=st.booleans())
def test_tfserving_json_decoder(document, raw, use_raw):
    body = raw if use_raw else json.dumps(document, allow_nan=True).encode()
    _client_error_only(lambda: tfserving_json.decode_predict_request(body, METADATA, model="digits"))


@FUZZ
@given(document=json_values, raw=st.binary(max_size=200), header=st.one_of(st.none(), st.integers(-5, 300)))
def test_v2_json_decoder(document, raw, header):
    body = json.dumps(document, allow_nan=True).encode() + raw
    _client_error_only(lambda: v2_json.decode_infer_request(body, model="digits", header_length=header))


def _parsed(message, data: bytes):
    """``message`` filled from ``data``, or None: grpc rejects unparsable bytes before our code runs."""
    from google.protobuf.message import DecodeError

    try:
        message.ParseFromString(data)
    except DecodeError:
        return None
    return message


@FUZZ
@given(data=st.binary(max_size=400))
def test_tensor_proto_decoder_on_arbitrary_bytes(data):
    from tensorflow.core.framework import tensor_pb2

    proto = _parsed(tensor_pb2.TensorProto(), data)
    if proto is not None:
        _client_error_only(lambda: tensor_proto.to_numpy(proto, "pixels"))


@FUZZ
@given(data=st.binary(max_size=400))
def test_predict_request_decoder_on_arbitrary_bytes(data):
    from tensorflow_serving.apis import predict_pb2

    request = _parsed(predict_pb2.PredictRequest(), data)
    if request is not None:
        _client_error_only(lambda: tensor_proto.decode_predict_request(request))


@FUZZ
@given(data=st.binary(max_size=400))
def test_model_infer_request_decoder_on_arbitrary_bytes(data):
    request = _parsed(oip.ModelInferRequest(), data)
    if request is not None:
        _client_error_only(lambda: v2_grpc.decode_infer_request(request))


@FUZZ
@given(
    raw=st.binary(max_size=300),
    datatype=st.sampled_from(
        ["FP32", "FP16", "FP64", "INT8", "INT64", "UINT32", "BOOL", "BYTES", "BF16", "X"]
    ),
    shape=st.lists(st.integers(-3, 70), max_size=3),
    as_view=st.booleans(),
)
def test_raw_tensor_decoder(raw, datatype, shape, as_view):
    # REST hands the codec a memoryview of the body, gRPC a bytes object.
    given_raw = memoryview(raw) if as_view else raw
    _client_error_only(lambda: binary_tensor.decode_binary_tensor(given_raw, datatype, shape, "pixels"))
