"""The wire-byte encoders give the very messages the protobuf encoders build."""

from __future__ import annotations

import numpy as np
import pytest

from modelloop.serving.codecs import tensor_proto, v2_grpc, wire
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_predict_pb2 as predict_pb2
from modelloop.serving.types import InferResponse

OUTPUTS = [
    {"probabilities": np.arange(20, dtype=np.float32).reshape(2, 10)},
    {"score": np.array([[0.5]], dtype=">f8"), "label": np.array([3, 300], dtype=np.int64)},
    {"flag": np.array([True, False]), "small": np.array([[1, 2, 255]], dtype=np.uint8)},
    {"big": np.full((1, 200), 7, dtype=np.int32), "empty": np.zeros((0, 3), dtype=np.float16)},
    {"scalar": np.array(2.5, dtype=np.float32), "wide": np.arange(6, dtype=np.uint64).reshape(3, 2)[:, ::-1]},
]


@pytest.mark.parametrize("outputs", OUTPUTS)
@pytest.mark.parametrize("version", [1, 130, 70000])
@pytest.mark.parametrize("signature", ["serving_default", ""])
def test_predict_bytes_parse_to_the_encoded_message(
    outputs: dict[str, np.ndarray], version: int, signature: str
) -> None:
    response = InferResponse(model="digits", version=version, outputs=outputs, id="a" * 32)
    data = wire.encode_predict_bytes(response, signature)
    assert data is not None
    parsed = predict_pb2.PredictResponse.FromString(data)
    assert parsed == tensor_proto.encode_predict_response(response, signature)


@pytest.mark.parametrize("outputs", OUTPUTS)
@pytest.mark.parametrize("request_id", [None, "", "client-7"])
def test_infer_bytes_parse_to_the_encoded_message(
    outputs: dict[str, np.ndarray], request_id: str | None
) -> None:
    response = InferResponse(model="digits", version=2, outputs=outputs, id="b" * 32)
    data = wire.encode_infer_bytes(response, request_id)
    assert data is not None
    parsed = pb.ModelInferResponse.FromString(data)
    assert parsed == v2_grpc.encode_infer_response(response, request_id)


def test_string_outputs_and_parameters_take_the_message_path() -> None:
    strings = InferResponse(model="m", version=1, outputs={"s": np.array(["a"], dtype=object)})
    assert wire.encode_predict_bytes(strings) is None
    assert wire.encode_infer_bytes(strings) is None
    numbers = {"x": np.ones((1, 1), dtype=np.float32)}
    with_parameters = InferResponse(model="m", version=1, outputs=numbers, parameters={"k": 1})
    assert wire.encode_infer_bytes(with_parameters) is None


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1])
def test_varint_matches_protobuf(value: int) -> None:
    tensor = pb.ModelInferResponse.InferOutputTensor(shape=[value])
    # The packed shape field: tag, length, then the varint itself.
    assert tensor.SerializeToString()[2:] == wire.varint(value)
