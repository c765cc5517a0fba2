"""Open Inference Protocol V2 JSON codec, with Triton's binary tensor extension."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from modelloop.serving.codecs import v2_json
from modelloop.serving.errors import InvalidInput
from modelloop.serving.types import InferResponse, ModelMetadata, Protocol, TensorSpec

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"

DIGITS = ModelMetadata(
    name="digits",
    version=1,
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("pixels", np.dtype("float32"), (-1, 64)),),
    outputs=(TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),),
)
GOLDEN_PROBS = np.array(
    [
        [0.5, 0.25, 0.125, 0.0625, 0.0625, 0, 0, 0, 0, 0],
        [0, 0.75, 0.25, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)


def golden(name: str) -> bytes:
    return (TESTDATA / name).read_bytes()


def decode(document: object, binary: bytes | None = None) -> v2_json.InferCall:
    header = document if isinstance(document, bytes) else json.dumps(document).encode()
    if binary is None:
        return v2_json.decode_infer_request(header, model="m")
    return v2_json.decode_infer_request(header + binary, model="m", header_length=len(header))


def pack_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def unpack_bytes(buffer: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(buffer):
        (n,) = struct.unpack_from("<I", buffer, offset)
        out.append(buffer[offset + 4 : offset + 4 + n])
        offset += 4 + n
    return out


def tensor(name: str, datatype: str, shape: list[int], data: object) -> dict[str, object]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def test_golden_request() -> None:
    body = golden("v2-infer-request.json")
    call = v2_json.decode_infer_request(body, model="digits", version=1)
    req = call.request
    assert (req.model, req.version, req.protocol, req.id) == ("digits", 1, Protocol.V2_REST, "golden-1")
    assert call.body_id == "golden-1"
    assert req.outputs == ["probabilities"]
    assert req.parameters == {"note": "golden"}
    expected = np.array(json.loads(body)["inputs"][0]["data"], np.float32).reshape(2, 64)
    np.testing.assert_array_equal(req.inputs["pixels"], expected)
    assert not call.wants_binary("probabilities")


def test_golden_response() -> None:
    call = decode(golden("v2-infer-request.json"))
    body, header_length = v2_json.encode_infer_response(
        InferResponse("digits", 1, {"probabilities": GOLDEN_PROBS}, id="server-id"), call
    )
    assert header_length is None
    assert json.loads(body) == json.loads(golden("v2-infer-response.json"))


def test_response_id_falls_back_to_request_id_and_keeps_parameters() -> None:
    call = decode({"inputs": [tensor("x", "FP32", [1], [1.0])]})
    assert call.body_id is None and call.request.id == ""
    body, _ = v2_json.encode_infer_response(
        InferResponse("m", 2, {"y": np.array([1], np.int32)}, id="rid", parameters={"k": 1}), call
    )
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "id": "rid",
        "parameters": {"k": 1},
        "outputs": [{"name": "y", "datatype": "INT32", "shape": [1], "data": [1]}],
    }


def test_nested_and_flat_data_are_the_same() -> None:
    flat = decode({"inputs": [tensor("x", "INT32", [2, 2], [1, 2, 3, 4])]}).request.inputs["x"]
    nested = decode({"inputs": [tensor("x", "INT32", [2, 2], [[1, 2], [3, 4]])]}).request.inputs["x"]
    np.testing.assert_array_equal(flat, nested)
    assert flat.dtype == np.int32 and flat.shape == (2, 2)


def test_every_json_datatype() -> None:
    call = decode(
        {
            "inputs": [
                tensor("b", "BOOL", [2], [True, False]),
                tensor("u8", "UINT8", [1], [255]),
                tensor("i64", "INT64", [1], [-5]),
                tensor("f16", "FP16", [1], [0.5]),
                tensor("f64", "FP64", [1], [1]),
                tensor("s", "BYTES", [2], ["hi", "ü"]),
            ]
        }
    )
    x = call.request.inputs
    assert x["b"].dtype == np.bool_ and x["u8"].dtype == np.uint8 and x["f16"].dtype == np.float16
    assert x["s"].tolist() == [b"hi", "ü".encode()]


def test_binary_inputs_every_kind() -> None:
    floats = np.arange(6, dtype=np.float32).reshape(2, 3)
    bools = np.array([True, False, True])
    strings = [b"ab", b"", b"\x00\xff"]
    blob = floats.tobytes() + bools.tobytes() + pack_bytes(strings)
    document = {
        "inputs": [
            {"name": "f", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
            {"name": "b", "datatype": "BOOL", "shape": [3], "parameters": {"binary_data_size": 3}},
            {
                "name": "s",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(pack_bytes(strings))},
            },
            tensor("j", "INT64", [1], [9]),
        ],
        "parameters": {"binary_data_output": True},
    }
    call = decode(document, blob)
    x = call.request.inputs
    np.testing.assert_array_equal(x["f"], floats)
    np.testing.assert_array_equal(x["b"], bools)
    assert x["s"].tolist() == strings and x["j"].tolist() == [9]
    assert not x["f"].flags.writeable and not x["b"].flags.writeable and not x["s"].flags.writeable
    assert call.binary_default and call.wants_binary("anything")


def test_binary_outputs_parse_like_tritonclient() -> None:
    call = decode(
        {
            "inputs": [tensor("x", "FP32", [1], [1.0])],
            "outputs": [
                {"name": "p", "parameters": {"binary_data": True}},
                {"name": "s", "parameters": {"binary_data": True}},
                {"name": "j", "parameters": {"binary_data": False}},
                {"name": "e"},
            ],
        }
    )
    assert call.request.outputs == ["p", "s", "j", "e"]
    outputs = {
        "p": GOLDEN_PROBS,
        "s": np.array([[b"a", b"bc"]], dtype=object),
        "j": np.array([[1, 2]], np.int64),
        "e": np.zeros((0, 3), np.float32),
    }
    body, header_length = v2_json.encode_infer_response(InferResponse("m", 1, outputs), call)
    assert header_length is not None
    # The same steps as tritonclient.http.InferResult: JSON header, then buffers in output order.
    header = json.loads(body[:header_length])
    buffer = body[header_length:]
    offset, arrays = 0, {}
    for out in header["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.array(out["data"]).reshape(out["shape"])
            continue
        chunk = buffer[offset : offset + size]
        offset += size
        if out["datatype"] == "BYTES":
            arrays[out["name"]] = np.array(unpack_bytes(chunk), dtype=object).reshape(out["shape"])
        else:
            arrays[out["name"]] = np.frombuffer(chunk, np.float32).reshape(out["shape"])
    assert offset == len(buffer)
    np.testing.assert_array_equal(arrays["p"], GOLDEN_PROBS)
    assert arrays["s"].tolist() == [[b"a", b"bc"]]
    assert arrays["j"].tolist() == [[1, 2]]
    assert arrays["e"].shape == (0, 3)


def test_non_finite_outputs_stay_non_finite() -> None:
    call = decode({"inputs": [tensor("x", "FP32", [1], [1.0])]})
    out = np.array([np.nan, np.inf], np.float32)
    body, _ = v2_json.encode_infer_response(InferResponse("m", 1, {"y": out}), call)
    data = json.loads(body)["outputs"][0]["data"]
    assert math.isnan(data[0]) and data[1] == math.inf


@pytest.mark.parametrize(
    ("document", "match"),
    [
        (b"{", "malformed JSON"),
        (b'"inputs"', "must be a JSON object"),
        ({}, '"inputs"'),
        ({"inputs": []}, '"inputs"'),
        ({"inputs": [1]}, r"inputs\[0\] must be an object"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, 'needs a "name"'),
        ({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}, 'needs a "datatype"'),
        ({"inputs": [tensor("x", "FP8", [1], [1])]}, "unsupported datatype 'FP8'"),
        ({"inputs": [tensor("x", "BF16", [1], [1])]}, "unsupported datatype 'BF16'"),
        ({"inputs": [tensor("x", "FP32", [-1], [1])]}, "non-negative integers"),
        ({"inputs": [tensor("x", "FP32", "1", [1])]}, "non-negative integers"),
        ({"inputs": [tensor("x", "FP32", [True], [1])]}, "non-negative integers"),
        (
            {"inputs": [tensor("x", "FP32", [2, 2], [1, 2, 3])]},
            r"shape \[2, 2\] needs 4 elements but data has 3",
        ),
        ({"inputs": [tensor("x", "FP32", [3], [[1, 2], [3]])]}, "ragged"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, 'has no "data"'),
        ({"inputs": [tensor("x", "FP32", [1], ["1"])]}, "but got a string"),
        ({"inputs": [tensor("x", "FP32", [1], [None])]}, "but got null"),
        ({"inputs": [tensor("x", "INT32", [1], [True])]}, "but got a boolean"),
        ({"inputs": [tensor("x", "BOOL", [1], [1])]}, "expects booleans"),
        ({"inputs": [tensor("x", "BYTES", [1], [1])]}, r"expects strings \(BYTES\)"),
        ({"inputs": [tensor("x", "BYTES", [1], [{"b64": "AA=="}])]}, "but got an object"),
        ({"inputs": [tensor("x", "UINT8", [1], [256])]}, "out of range for uint8"),
        ({"inputs": [tensor("x", "FP32", [1], [1]), tensor("x", "FP32", [1], [1])]}, "appears twice"),
        ({"id": 5, "inputs": [tensor("x", "FP32", [1], [1])]}, '"id" must be a string'),
        ({"parameters": [], "inputs": [tensor("x", "FP32", [1], [1])]}, '"parameters" must be an object'),
        (
            {"parameters": {"binary_data_output": "yes"}, "inputs": [tensor("x", "FP32", [1], [1])]},
            "binary_data_output",
        ),
        ({"inputs": [tensor("x", "FP32", [1], [1])], "outputs": {}}, '"outputs" must be a list'),
        ({"inputs": [tensor("x", "FP32", [1], [1])], "outputs": [{}]}, r"outputs\[0\]"),
        (
            {"inputs": [tensor("x", "FP32", [1], [1])], "outputs": [{"name": "y"}, {"name": "y"}]},
            "requested twice",
        ),
        (
            {
                "inputs": [tensor("x", "FP32", [1], [1])],
                "outputs": [{"name": "y", "parameters": {"binary_data": 1}}],
            },
            '"binary_data" must be a boolean',
        ),
        (
            {"inputs": [{**tensor("x", "FP32", [1], [1]), "parameters": {"binary_data_size": 4}}]},
            "both",
        ),
    ],
)
def test_bad_json_requests(document: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        decode(document)


def binary_input(datatype: str, shape: list[int], size: object) -> dict[str, object]:
    return {"name": "x", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize(
    ("document", "blob", "match"),
    [
        ({"inputs": [binary_input("FP32", [2], 8)]}, b"\0" * 4, "only 4 bytes"),
        (
            {"inputs": [binary_input("FP32", [2], 4)]},
            b"\0" * 4,
            "raw content has 4 bytes, but .* needs 8 bytes",
        ),
        ({"inputs": [binary_input("FP32", [1], 4)]}, b"\0" * 6, "add up to 4"),
        ({"inputs": [binary_input("FP32", [1], -4)]}, b"\0" * 4, "non-negative integer"),
        ({"inputs": [binary_input("BYTES", [2], 9)]}, pack_bytes([b"abcde"]), "needs 2 BYTES elements"),
        ({"inputs": [binary_input("BYTES", [1], 3)]}, b"\1\0\0", "inside the 4-byte length prefix"),
        ({"inputs": [binary_input("BYTES", [1], 5)]}, b"\x09\0\0\0a", "claims 9 bytes, but only 1 remain"),
        ({"inputs": [binary_input("BYTES", [1], 6)]}, pack_bytes([b"a"]) + b"z", "1 byte left over"),
        ({"inputs": [binary_input("BOOL", [2], 2)]}, b"\1\2", "BOOL element 1 is the byte 2"),
        ({"inputs": [tensor("x", "FP32", [1], [1])]}, b"\0" * 4, "add up to 0"),
    ],
)
def test_bad_binary_requests(document: dict[str, object], blob: bytes, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        decode(document, blob)


def test_header_length_beyond_body() -> None:
    with pytest.raises(InvalidInput, match="only 2 bytes"):
        v2_json.decode_infer_request(b"{}", model="m", header_length=10)


def test_golden_model_metadata() -> None:
    body = v2_json.encode_model_metadata(DIGITS, [1])
    assert json.loads(body) == json.loads(golden("v2-model-metadata-response.json"))


def test_repository_index_and_request() -> None:
    entries = [
        {"name": "a", "version": "1", "state": "AVAILABLE", "reason": ""},
        {"name": "a", "version": "2", "state": "LOADING", "reason": ""},
    ]
    assert json.loads(v2_json.encode_repository_index(entries)) == entries
    assert json.loads(v2_json.encode_repository_index(entries, ready_only=True)) == entries[:1]
    assert v2_json.decode_repository_index_request(b"") is False
    assert v2_json.decode_repository_index_request(b'{"ready": true}') is True
    with pytest.raises(InvalidInput, match="must be a boolean"):
        v2_json.decode_repository_index_request(b'{"ready": 1}')
    with pytest.raises(InvalidInput, match="JSON object"):
        v2_json.decode_repository_index_request(b"[]")


def test_server_metadata() -> None:
    meta = {"name": "modelloop", "version": "0.1.0", "extensions": ["binary_tensor_data", "statistics"]}
    assert json.loads(v2_json.encode_server_metadata(meta)) == meta
