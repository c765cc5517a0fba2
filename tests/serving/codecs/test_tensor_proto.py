"""The TensorProto codec: every encoding clients use, parity with TensorFlow, every error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.python.framework import tensor_util
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from modelloop.serving.codecs import tensor_proto
from modelloop.serving.errors import InvalidInput
from modelloop.serving.types import (
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    TensorSpec,
    VersionStatus,
)

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"

NUMERIC_DTYPES = [
    "float32",
    "float64",
    "float16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
]


def _wire(proto: tensor_pb2.TensorProto) -> tensor_pb2.TensorProto:
    """Sends a proto through serialization, as the network would."""
    return tensor_pb2.TensorProto.FromString(proto.SerializeToString())


def _sample(dtype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dtype)


def _typed(dtype: int, shape: list[int], **values: object) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for d in shape:
        proto.tensor_shape.dim.add(size=d)
    return _wire(proto)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
def test_decodes_what_tensorflow_encodes(dtype: str) -> None:
    array = _sample(dtype)
    proto = _wire(tensor_util.make_tensor_proto(array))
    decoded = tensor_proto.to_numpy(proto, "x")
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)
    decoded[0, 0] = decoded[0, 1]  # writable: runtimes may write into their inputs


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
def test_tensorflow_decodes_what_we_encode(dtype: str) -> None:
    array = _sample(dtype)
    proto = _wire(tensor_proto.from_numpy(array))
    assert proto.tensor_content, "numeric outputs use tensor_content"
    decoded = tensor_util.MakeNdarray(proto)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_round_trips_strings_through_string_val() -> None:
    array = np.array([["a", "bé"], [b"\x00\xff", "d"]], dtype=object)
    proto = _wire(tensor_proto.from_numpy(array))
    assert proto.dtype == types_pb2.DT_STRING and not proto.tensor_content
    expected = [[b"a", "bé".encode()], [b"\x00\xff", b"d"]]
    assert tensor_util.MakeNdarray(proto).tolist() == expected
    assert tensor_proto.to_numpy(proto).tolist() == expected
    tf_proto = _wire(tensor_util.make_tensor_proto([b"x", b"yz"]))
    assert tensor_proto.to_numpy(tf_proto, "s").tolist() == [b"x", b"yz"]


def test_encodes_numpy_unicode_arrays() -> None:
    proto = tensor_proto.from_numpy(np.array(["ab", "c"]))
    assert list(proto.string_val) == [b"ab", b"c"]


@pytest.mark.parametrize(
    ("dtype", "enum", "field", "values"),
    [
        ("float32", types_pb2.DT_FLOAT, "float_val", [1.5, -2.0, 3.25, 0.0]),
        ("float64", types_pb2.DT_DOUBLE, "double_val", [1e300, -2.0, 3.25, 0.0]),
        ("int32", types_pb2.DT_INT32, "int_val", [2**31 - 1, -(2**31), 0, 7]),
        ("int16", types_pb2.DT_INT16, "int_val", [32767, -32768, 0, 7]),
        ("int8", types_pb2.DT_INT8, "int_val", [127, -128, 0, 7]),
        ("uint8", types_pb2.DT_UINT8, "int_val", [255, 0, 1, 7]),
        ("uint16", types_pb2.DT_UINT16, "int_val", [65535, 0, 1, 7]),
        ("int64", types_pb2.DT_INT64, "int64_val", [2**63 - 1, -(2**63), 0, 7]),
        ("bool", types_pb2.DT_BOOL, "bool_val", [True, False, True, True]),
        ("uint32", types_pb2.DT_UINT32, "uint32_val", [2**32 - 1, 0, 1, 7]),
        ("uint64", types_pb2.DT_UINT64, "uint64_val", [2**64 - 1, 0, 1, 7]),
    ],
)
def test_decodes_every_typed_field(dtype: str, enum: int, field: str, values: list[object]) -> None:
    proto = _typed(enum, [2, 2], **{field: values})
    decoded = tensor_proto.to_numpy(proto, "x")
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == (2, 2)
    np.testing.assert_array_equal(decoded.reshape(-1), np.array(values, dtype=dtype))
    np.testing.assert_array_equal(decoded, tensor_util.MakeNdarray(proto))


def test_decodes_half_val_bit_patterns() -> None:
    expected = np.array([1.0, -2.5, 65504.0], dtype=np.float16)
    proto = _typed(types_pb2.DT_HALF, [3], half_val=expected.view(np.uint16).astype(np.int32).tolist())
    decoded = tensor_proto.to_numpy(proto, "h")
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, expected)


def test_decodes_string_val_as_bytes_objects() -> None:
    proto = _typed(types_pb2.DT_STRING, [2, 1], string_val=[b"a", b"b"])
    decoded = tensor_proto.to_numpy(proto, "s")
    assert decoded.dtype == object and decoded.tolist() == [[b"a"], [b"b"]]


def test_one_value_fills_the_shape_as_tensorflow_does() -> None:
    proto = _wire(tensor_util.make_tensor_proto(np.float32(0.5), shape=[2, 3]))
    assert list(proto.float_val) == [0.5]
    decoded = tensor_proto.to_numpy(proto, "x")
    np.testing.assert_array_equal(decoded, np.full((2, 3), 0.5, dtype=np.float32))
    strings = _typed(types_pb2.DT_STRING, [2], string_val=[b"z"])
    assert tensor_proto.to_numpy(strings).tolist() == [b"z", b"z"]


def test_scalar_and_empty_tensors() -> None:
    scalar = _typed(types_pb2.DT_INT64, [], int64_val=[42])
    assert tensor_proto.to_numpy(scalar).shape == ()
    assert int(tensor_proto.to_numpy(scalar)) == 42
    empty = _typed(types_pb2.DT_FLOAT, [0, 64])
    assert tensor_proto.to_numpy(empty).shape == (0, 64)
    empty_content = tensor_proto.from_numpy(np.zeros((0, 3), dtype=np.float32))
    assert tensor_proto.to_numpy(_wire(empty_content)).shape == (0, 3)


def test_tensor_content_is_little_endian() -> None:
    big = np.array([1.0, 2.0], dtype=">f4")
    proto = tensor_proto.from_numpy(big)
    assert proto.tensor_content == np.array([1.0, 2.0], dtype="<f4").tobytes()


# --- errors -----------------------------------------------------------------------------


def _raises(proto: tensor_pb2.TensorProto, *fragments: str) -> None:
    with pytest.raises(InvalidInput) as info:
        tensor_proto.to_numpy(proto, "pixels")
    message = str(info.value)
    assert "'pixels'" in message
    for fragment in fragments:
        assert fragment in message, message


def test_rejects_tensor_content_of_the_wrong_length() -> None:
    proto = _typed(types_pb2.DT_FLOAT, [2, 64], tensor_content=b"\x00" * (4 * 127))
    _raises(proto, "tensor_content has 508 bytes", "needs 512")


def test_rejects_a_value_count_that_disagrees_with_the_shape() -> None:
    _raises(_typed(types_pb2.DT_FLOAT, [2, 3], float_val=[1.0] * 5), "float_val has 5 values", "6 elements")
    _raises(_typed(types_pb2.DT_FLOAT, [2, 3], float_val=[1.0] * 7), "float_val has 7 values")


def test_rejects_a_tensor_with_no_values() -> None:
    _raises(_typed(types_pb2.DT_FLOAT, [1, 64]), "needs 64 value(s)", "float_val")


def test_rejects_values_in_the_wrong_field_and_says_where_they_are() -> None:
    _raises(_typed(types_pb2.DT_FLOAT, [2], double_val=[1.0, 2.0]), "found values in double_val")
    _raises(_typed(types_pb2.DT_FLOAT, [0], int_val=[1]), "found values in int_val")


@pytest.mark.parametrize(
    ("enum", "value", "dtype"),
    [
        (types_pb2.DT_UINT8, 256, "uint8"),
        (types_pb2.DT_UINT8, -1, "uint8"),
        (types_pb2.DT_INT8, 128, "int8"),
        (types_pb2.DT_INT16, -32769, "int16"),
        (types_pb2.DT_UINT16, 65536, "uint16"),
    ],
)
def test_rejects_int_val_out_of_range(enum: int, value: int, dtype: str) -> None:
    _raises(_typed(enum, [2], int_val=[0, value]), f"out of range for {dtype}", str(value))


def test_rejects_half_val_out_of_range() -> None:
    _raises(_typed(types_pb2.DT_HALF, [1], half_val=[70000]), "out of range")


@pytest.mark.parametrize("enum", [types_pb2.DT_INVALID, types_pb2.DT_COMPLEX64, types_pb2.DT_BFLOAT16, 999])
def test_rejects_unsupported_dtypes(enum: int) -> None:
    _raises(_typed(enum, [1], float_val=[1.0]), "unsupported dtype", "DT_FLOAT")


def test_rejects_negative_dimensions_and_unknown_rank() -> None:
    _raises(_typed(types_pb2.DT_FLOAT, [-1, 64], float_val=[1.0]), "negative dimension")
    unknown = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    unknown.tensor_shape.unknown_rank = True
    _raises(unknown, "unknown_rank")


def test_rejects_string_tensor_content() -> None:
    _raises(_typed(types_pb2.DT_STRING, [1], tensor_content=b"\x01a"), "string_val")


def test_rejects_dtypes_without_a_tensorflow_type_on_encode() -> None:
    with pytest.raises(InvalidInput, match="complex128"):
        tensor_proto.from_numpy(np.zeros(2, dtype=np.complex128))


# --- PredictionService messages -----------------------------------------------------------


def _golden_request() -> predict_pb2.PredictRequest:
    text = (TESTDATA / "tfserving_grpc_predict_digits.pbtxt").read_text()
    return text_format.Parse(text, predict_pb2.PredictRequest())


def test_decodes_the_golden_predict_request() -> None:
    request = tensor_proto.decode_predict_request(_golden_request(), request_id="abc")
    assert request.model == "digits"
    assert request.version == 1 and request.label is None
    assert request.signature_name == "serving_default"
    assert request.outputs == ["probabilities"]
    assert request.protocol is Protocol.TFSERVING_GRPC
    assert request.id == "abc"
    pixels = request.inputs["pixels"]
    assert pixels.dtype == np.float32 and pixels.shape == (2, 64)
    assert pixels[0, 0] == 0.0 and pixels[1, 63] == 16.0


def test_decodes_version_labels_and_defaults() -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.version_label = "stable"
    request.inputs["x"].CopyFrom(tensor_proto.from_numpy(np.zeros((1, 2), dtype=np.float32)))
    decoded = tensor_proto.decode_predict_request(request)
    assert (decoded.version, decoded.label, decoded.signature_name, decoded.outputs) == (
        None,
        "stable",
        None,
        None,
    )
    assert decoded.id == ""


def test_predict_request_errors() -> None:
    request = predict_pb2.PredictRequest()
    with pytest.raises(InvalidInput, match=r"model_spec\.name is required"):
        tensor_proto.decode_predict_request(request)
    request.model_spec.name = "digits"
    with pytest.raises(InvalidInput, match="no inputs"):
        tensor_proto.decode_predict_request(request)
    bad = request.inputs["pixels"]
    bad.dtype = types_pb2.DT_FLOAT
    bad.tensor_shape.dim.add(size=3)
    bad.float_val.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match=r"'pixels'.*float_val has 2 values"):
        tensor_proto.decode_predict_request(request)


def test_encodes_predict_response() -> None:
    probabilities = np.array([[0.25, 0.75]], dtype=np.float32)
    response = tensor_proto.encode_predict_response(
        InferResponse(model="digits", version=3, outputs={"probabilities": probabilities}, id="r")
    )
    wire = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    assert wire.model_spec.name == "digits"
    assert wire.model_spec.version.value == 3
    assert wire.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tensor_util.MakeNdarray(wire.outputs["probabilities"]), probabilities)


METADATA = ModelMetadata(
    name="digits",
    version=2,
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("pixels", np.dtype("float32"), (-1, 64)),),
    outputs=(TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),),
    labels=tuple(str(i) for i in range(10)),
)


def test_encodes_model_metadata_with_a_packed_signature_def_map() -> None:
    response = tensor_proto.encode_model_metadata_response(METADATA)
    wire = get_model_metadata_pb2.GetModelMetadataResponse.FromString(response.SerializeToString())
    assert wire.model_spec.name == "digits" and wire.model_spec.version.value == 2
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert wire.metadata["signature_def"].Unpack(signature_map)
    signature = signature_map.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    pixels = signature.inputs["pixels"]
    assert pixels.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in pixels.tensor_shape.dim] == [-1, 64]
    assert [d.size for d in signature.outputs["probabilities"].tensor_shape.dim] == [-1, 10]


def test_metadata_fields() -> None:
    tensor_proto.check_metadata_fields([])
    tensor_proto.check_metadata_fields(["signature_def"])
    with pytest.raises(InvalidInput, match="'labels' is not supported"):
        tensor_proto.check_metadata_fields(["signature_def", "labels"])


def test_encodes_model_status() -> None:
    response = tensor_proto.encode_model_status_response(
        [
            VersionStatus(1, ModelState.AVAILABLE),
            VersionStatus(2, ModelState.FAILED, "corrupt model.onnx"),
            VersionStatus(3, ModelState.LOADING),
        ]
    )
    states = get_model_status_pb2.ModelVersionStatus
    entries = list(response.model_version_status)
    assert [(e.version, e.state) for e in entries] == [
        (1, states.AVAILABLE),
        (2, states.END),
        (3, states.LOADING),
    ]
    assert entries[0].status.error_code == 0 and entries[0].status.error_message == ""
    assert entries[1].status.error_code == 2 and entries[1].status.error_message == "corrupt model.onnx"


@pytest.mark.parametrize(("field", "value"), [("version", 3), ("version_label", "stable"), (None, None)])
def test_decode_model_spec_splits_name_version_label_and_signature(field: str | None, value: object) -> None:
    spec = model_pb2.ModelSpec(name="digits", signature_name="serving_default")
    if field == "version":
        spec.version.value = value  # type: ignore[assignment]
    elif field == "version_label":
        spec.version_label = value  # type: ignore[assignment]
    name, version, label, signature = tensor_proto.decode_model_spec(spec)
    assert (name, signature) == ("digits", "serving_default")
    assert version == (value if field == "version" else None)
    assert label == (value if field == "version_label" else None)


def test_a_negative_version_is_invalid_like_on_every_transport() -> None:
    spec = model_pb2.ModelSpec(name="digits")
    spec.version.value = -1
    with pytest.raises(InvalidInput, match='non-negative integer, got "-1"'):
        tensor_proto.decode_model_spec(spec)
    with pytest.raises(InvalidInput, match=r"model_spec\.name is required"):
        tensor_proto.decode_model_spec(model_pb2.ModelSpec())
