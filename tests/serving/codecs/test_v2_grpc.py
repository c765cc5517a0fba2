"""The OIP gRPC codec: typed and raw contents, BYTES, parameters, responses, every error."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from modelloop.serving.codecs import binary_tensor, v2_grpc
from modelloop.serving.errors import InvalidInput
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.types import InferResponse, ModelMetadata, Protocol, TensorSpec, VersionConfig

TYPED = [
    ("BOOL", "bool_contents", [True, False, True, True]),
    ("INT8", "int_contents", [127, -128, 0, 1]),
    ("INT16", "int_contents", [32767, -32768, 0, 1]),
    ("INT32", "int_contents", [2**31 - 1, -(2**31), 0, 1]),
    ("INT64", "int64_contents", [2**63 - 1, -(2**63), 0, 1]),
    ("UINT8", "uint_contents", [255, 0, 1, 2]),
    ("UINT16", "uint_contents", [65535, 0, 1, 2]),
    ("UINT32", "uint_contents", [2**32 - 1, 0, 1, 2]),
    ("UINT64", "uint64_contents", [2**64 - 1, 0, 1, 2]),
    ("FP32", "fp32_contents", [1.5, -2.0, 0.0, 3.25]),
    ("FP64", "fp64_contents", [1e300, -2.0, 0.0, 3.25]),
    ("BYTES", "bytes_contents", [b"a", b"", b"\x00\xff", "é".encode()]),
]
NUMPY = {
    "BOOL": "bool",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}


def _wire(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(request.SerializeToString())


def _request(**fields: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="digits", **fields)


def _bytes_raw(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


@pytest.mark.parametrize(("datatype", "field", "values"), TYPED)
def test_decodes_typed_contents(datatype: str, field: str, values: list[object]) -> None:
    request = _request()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    getattr(tensor.contents, field).extend(values)
    decoded = v2_grpc.decode_infer_request(_wire(request))
    array = decoded.inputs["x"]
    assert array.dtype == np.dtype(NUMPY[datatype]) and array.shape == (2, 2)
    assert array.reshape(-1).tolist() == list(values)


@pytest.mark.parametrize(("datatype", "field", "values"), TYPED)
def test_decodes_raw_contents(datatype: str, field: str, values: list[object]) -> None:
    request = _request()
    request.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    if datatype == "BYTES":
        raw = _bytes_raw(values)  # type: ignore[arg-type]
    else:
        raw = np.array(values, dtype=NUMPY[datatype]).astype(np.dtype(NUMPY[datatype]).newbyteorder("<"))
        raw = raw.tobytes()
    request.raw_input_contents.append(raw)
    array = v2_grpc.decode_infer_request(_wire(request)).inputs["x"]
    assert array.dtype == np.dtype(NUMPY[datatype]) and array.shape == (2, 2)
    assert array.reshape(-1).tolist() == list(values)
    # Read-only on both transports (REST's binary data always was): a view of the request.
    assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        array[0, 0] = array[1, 1]


def test_decodes_fp16_raw_and_several_inputs_in_order() -> None:
    halves = np.array([[1.0, -0.5]], dtype=np.float16)
    ints = np.array([[1, 2, 3]], dtype=np.int64)
    request = _request()
    request.inputs.add(name="h", datatype="FP16", shape=[1, 2])
    request.inputs.add(name="i", datatype="INT64", shape=[1, 3])
    request.raw_input_contents.extend([halves.tobytes(), ints.tobytes()])
    decoded = v2_grpc.decode_infer_request(_wire(request))
    np.testing.assert_array_equal(decoded.inputs["h"], halves)
    np.testing.assert_array_equal(decoded.inputs["i"], ints)
    assert list(decoded.inputs) == ["h", "i"]


def test_decodes_request_fields() -> None:
    request = _request(model_version="3", id="oip-id")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1.0)
    request.outputs.add(name="probabilities")
    request.parameters["flag"].bool_param = True
    request.parameters["n"].int64_param = -4
    request.parameters["s"].string_param = "v"
    request.parameters["d"].double_param = 0.5
    request.parameters["u"].uint64_param = 2**64 - 1
    request.parameters["unset"].CopyFrom(pb.InferParameter())
    decoded = v2_grpc.decode_infer_request(_wire(request))
    assert decoded.model == "digits" and decoded.version == 3 and decoded.label is None
    assert decoded.protocol is Protocol.V2_GRPC
    assert decoded.outputs == ["probabilities"]
    assert decoded.id == "oip-id"
    assert decoded.parameters == {"flag": True, "n": -4, "s": "v", "d": 0.5, "u": 2**64 - 1}
    assert v2_grpc.decode_infer_request(request, request_id="header-id").id == "header-id"


def test_empty_version_and_outputs_mean_the_servers_choice() -> None:
    request = _request()
    request.inputs.add(name="x", datatype="FP32", shape=[0, 3])
    decoded = v2_grpc.decode_infer_request(request)
    assert decoded.version is None and decoded.outputs is None and decoded.id == ""
    assert decoded.inputs["x"].shape == (0, 3)


# --- errors -----------------------------------------------------------------------------


def _raises(request: pb.ModelInferRequest, *fragments: str) -> None:
    with pytest.raises(InvalidInput) as info:
        v2_grpc.decode_infer_request(_wire(request))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_rejects_a_request_without_model_or_inputs() -> None:
    _raises(pb.ModelInferRequest(), "model_name is required")
    _raises(_request(), "no inputs")


def test_rejects_a_non_integer_version() -> None:
    request = _request(model_version="latest")
    request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    _raises(request, 'model version must be a non-negative integer, got "latest"')


def test_rejects_typed_contents_that_disagree_with_the_shape() -> None:
    request = _request()
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(
        [1.0] * 63
    )
    _raises(request, "'pixels'", "needs 64 elements", "fp32_contents has 63")


def test_rejects_contents_in_the_wrong_field_and_says_where_they_are() -> None:
    request = _request()
    request.inputs.add(name="pixels", datatype="FP32", shape=[2]).contents.fp64_contents.extend([1.0, 2.0])
    _raises(request, "values found in fp64_contents")


def test_rejects_raw_content_of_the_wrong_length() -> None:
    request = _request()
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * 255)
    _raises(request, "'pixels'", "raw content has 255 bytes", "needs 256 bytes (64 x 4)")


def test_rejects_mixed_raw_and_typed_contents() -> None:
    request = _request()
    request.inputs.add(name="a", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.extend([b"\x00" * 4, b"\x00" * 4])
    _raises(request, "no input may set contents", "'a'")


def test_rejects_a_raw_entry_count_that_differs_from_the_inputs() -> None:
    request = _request()
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\x00" * 4)
    _raises(request, "raw_input_contents has 1 entries for 2 inputs")


@pytest.mark.parametrize("datatype", ["FP8", "BF16", "fp32", ""])
def test_rejects_unknown_datatypes(datatype: str) -> None:
    request = _request()
    request.inputs.add(name="pixels", datatype=datatype, shape=[1]).contents.fp32_contents.append(1.0)
    _raises(request, "'pixels'", "unsupported datatype")
    raw = _request()
    raw.inputs.add(name="pixels", datatype=datatype, shape=[1])
    raw.raw_input_contents.append(b"\x00" * 4)
    _raises(raw, "'pixels'", "unsupported datatype")


def test_rejects_fp16_in_typed_contents() -> None:
    request = _request()
    request.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    _raises(request, "'h'", "FP16 has no typed contents field", "raw_input_contents")


def test_rejects_negative_dims_duplicates_and_nameless_inputs() -> None:
    request = _request()
    request.inputs.add(name="x", datatype="FP32", shape=[-1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    _raises(request, "negative dimension")
    request = _request()
    for _ in range(2):
        request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    _raises(request, "'x' appears more than once")
    request = _request()
    request.inputs.add(datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    _raises(request, "input 0 has no name")


@pytest.mark.parametrize(
    ("datatype", "field", "value"),
    [("INT8", "int_contents", 128), ("UINT8", "uint_contents", 256), ("INT16", "int_contents", -40000)],
)
def test_rejects_narrow_ints_out_of_range(datatype: str, field: str, value: int) -> None:
    request = _request()
    getattr(request.inputs.add(name="x", datatype=datatype, shape=[1]).contents, field).append(value)
    _raises(request, "out of range", str(value))


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (_bytes_raw([b"ab"]), "needs 2 BYTES elements, but the raw content (6 bytes) ends after 1"),
        (_bytes_raw([b"ab"]) + struct.pack("<I", 9) + b"xy", "claims 9 bytes, but only 2 remain"),
        (_bytes_raw([b"a", b"b"]) + b"\x00", "1 byte left over after the 2 BYTES elements"),
        (b"\x01\x00", "ends inside the 4-byte length prefix of BYTES element 0 of 2"),
    ],
)
def test_rejects_malformed_raw_bytes(raw: bytes, fragment: str) -> None:
    request = _request()
    request.inputs.add(name="s", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(raw)
    _raises(request, "'s'", fragment)


# --- responses and metadata ---------------------------------------------------------------


def test_encodes_raw_outputs_that_decode_back() -> None:
    outputs = {
        "probabilities": np.array([[0.25, 0.75]], dtype=np.float32),
        "labels": np.array([["a", b"bc"]], dtype=object),
        "flags": np.array([True, False]),
        "big": np.array([1, 2], dtype=">i8"),
    }
    response = v2_grpc.encode_infer_response(
        InferResponse(model="digits", version=4, outputs=outputs, id="gen", parameters={"p": 1})
    )
    wire = pb.ModelInferResponse.FromString(response.SerializeToString())
    assert (wire.model_name, wire.model_version, wire.id) == ("digits", "4", "gen")
    assert wire.parameters["p"].int64_param == 1
    assert [(o.name, o.datatype, list(o.shape)) for o in wire.outputs] == [
        ("probabilities", "FP32", [1, 2]),
        ("labels", "BYTES", [1, 2]),
        ("flags", "BOOL", [2]),
        ("big", "INT64", [2]),
    ]
    assert not any(o.HasField("contents") for o in wire.outputs)
    decoded = [
        binary_tensor.decode_binary_tensor(raw, o.datatype, o.shape, o.name)
        for o, raw in zip(wire.outputs, wire.raw_output_contents, strict=True)
    ]
    np.testing.assert_array_equal(decoded[0], outputs["probabilities"])
    assert decoded[1].tolist() == [[b"a", b"bc"]]
    assert decoded[2].tolist() == [True, False]
    assert decoded[3].tolist() == [1, 2]
    assert wire.raw_output_contents[3] == np.array([1, 2], dtype="<i8").tobytes()


def test_response_echoes_the_oip_request_id_when_given() -> None:
    response = InferResponse(model="m", version=1, outputs={}, id="header-id")
    assert v2_grpc.encode_infer_response(response, request_id="oip-id").id == "oip-id"
    assert v2_grpc.encode_infer_response(response).id == "header-id"


def test_encodes_parameters_by_type() -> None:
    assert v2_grpc.encode_parameter(True).WhichOneof("parameter_choice") == "bool_param"
    assert v2_grpc.encode_parameter(np.int32(3)).int64_param == 3
    assert v2_grpc.encode_parameter(2**64 - 1).uint64_param == 2**64 - 1
    assert v2_grpc.encode_parameter(0.5).double_param == 0.5
    assert v2_grpc.encode_parameter("s").string_param == "s"
    assert v2_grpc.encode_parameter([1]).string_param == "[1]"


METADATA = ModelMetadata(
    name="digits",
    version=2,
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("pixels", np.dtype("float32"), (-1, 64)),),
    outputs=(TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),),
)


def test_encodes_model_metadata_and_config() -> None:
    response = v2_grpc.encode_model_metadata(METADATA, versions=[2, 1])
    assert (response.name, list(response.versions), response.platform) == (
        "digits",
        ["1", "2"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [("pixels", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("probabilities", "FP32", [-1, 10])
    ]
    assert list(v2_grpc.encode_model_metadata(METADATA).versions) == ["2"]
    served = VersionConfig(METADATA, {"intra_op_num_threads": "1", "allow_spinning": "false"})
    config = v2_grpc.encode_model_config(served).config
    assert {k: v.string_value for k, v in config.parameters.items()} == served.parameters
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "digits",
        "onnxruntime_onnx",
        "onnxruntime",
        0,
    )
    assert (config.input[0].name, config.input[0].data_type, list(config.input[0].dims)) == (
        "pixels",
        pb.TYPE_FP32,
        [-1, 64],
    )
    assert config.output[0].data_type == pb.TYPE_FP32


def test_encodes_server_metadata_and_repository_index() -> None:
    meta = v2_grpc.encode_server_metadata({"name": "modelloop", "version": "0.1.0", "extensions": ["x"]})
    assert (meta.name, meta.version, list(meta.extensions)) == ("modelloop", "0.1.0", ["x"])
    entries = [
        {"name": "digits", "version": 1, "state": "READY", "reason": ""},
        {"name": "digits", "version": 2, "state": "UNAVAILABLE", "reason": "corrupt"},
        {"name": "other", "version": None, "state": "UNAVAILABLE", "reason": None},
    ]
    index = v2_grpc.encode_repository_index(entries)
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("digits", "1", "READY", ""),
        ("digits", "2", "UNAVAILABLE", "corrupt"),
        ("other", "", "UNAVAILABLE", ""),
    ]
    assert [m.version for m in v2_grpc.encode_repository_index(entries, ready_only=True).models] == ["1"]
