"""Triton's binary tensor format: every OIP datatype, both transports, every error."""

from __future__ import annotations

import doctest
import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelloop.serving.codecs import binary_tensor, v2_grpc, v2_json
from modelloop.serving.codecs.binary_tensor import decode_binary_tensor, encode_binary_tensor
from modelloop.serving.datatypes import OIP_TO_NUMPY, to_oip_datatype
from modelloop.serving.errors import InvalidInput
from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.types import InferResponse
from tests.tools import clients_python

ROOT = Path(__file__).resolve().parents[3]

# Each OIP datatype with values that reach its limits, as 2 x 2 tensors.
NUMERIC = {
    "BOOL": np.array([[True, False], [False, True]]),
    "UINT8": np.array([[0, 1], [254, 255]], np.uint8),
    "UINT16": np.array([[0, 1], [2**16 - 2, 2**16 - 1]], np.uint16),
    "UINT32": np.array([[0, 1], [2**32 - 2, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 1], [2**64 - 2, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, -1], [0, 127]], np.int8),
    "INT16": np.array([[-(2**15), -1], [0, 2**15 - 1]], np.int16),
    "INT32": np.array([[-(2**31), -1], [0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), -1], [0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-65504.0, 0.5], [np.inf, np.nan]], np.float16),
    "FP32": np.array([[-3.4e38, 1.5], [-np.inf, np.nan]], np.float32),
    "FP64": np.array([[-1.7e308, 5e-324], [np.inf, np.nan]], np.float64),
}
# Empty, non-ASCII, NUL and invalid UTF-8 elements; str goes out as UTF-8.
STRINGS = np.array([["", b""], ["héllo wörld ✓", b"\x00\xff\xfe"]], dtype=object)
STRING_BYTES = [b"", b"", "héllo wörld ✓".encode(), b"\x00\xff\xfe"]
ALL = {**NUMERIC, "BYTES": STRINGS}


def objects(*values: object) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (np.array would unpack a bytearray)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def packed(values: list[bytes]) -> bytes:
    """The BYTES layout written out by hand: 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def expected_raw(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return packed(STRING_BYTES)
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


# --- round trips --------------------------------------------------------------------------


def test_docstring_examples() -> None:
    results = doctest.testmod(binary_tensor)
    assert results.attempted >= 5 and results.failed == 0


@pytest.mark.parametrize("datatype", list(ALL))
def test_round_trip_every_datatype(datatype: str) -> None:
    array = ALL[datatype]
    raw = encode_binary_tensor(array, datatype)
    assert raw == expected_raw(datatype, array)
    assert encode_binary_tensor(array) == raw, "the datatype is taken from the array when not given"
    decoded = decode_binary_tensor(raw, datatype, [2, 2], "x")
    assert decoded.shape == (2, 2)
    if datatype == "BYTES":
        assert decoded.dtype == np.dtype(object)
        assert decoded.reshape(-1).tolist() == STRING_BYTES
        assert all(type(v) is bytes for v in decoded.reshape(-1))
    else:
        assert decoded.dtype == array.dtype and decoded.dtype.isnative
        np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.writeable


@pytest.mark.parametrize("datatype", list(ALL))
@pytest.mark.parametrize("shape", [[], [0], [0, 3], [1, 1, 1]])
def test_scalar_empty_and_unit_shapes(datatype: str, shape: list[int]) -> None:
    dtype = ALL[datatype].dtype
    array = np.full(shape, "é" if datatype == "BYTES" else 1, dtype=dtype)
    decoded = decode_binary_tensor(encode_binary_tensor(array), datatype, shape, "x")
    assert decoded.shape == tuple(shape) and decoded.dtype == dtype and not decoded.flags.writeable
    expected = [b"\xc3\xa9"] * array.size if datatype == "BYTES" else array.reshape(-1).tolist()
    assert decoded.reshape(-1).tolist() == expected


def test_numeric_decode_is_a_zero_copy_view() -> None:
    body = bytearray(np.array([1.0, 2.0], "<f4").tobytes())
    decoded = decode_binary_tensor(memoryview(body), "FP32", [2], "x")
    # Read-only although the buffer is writable, and the buffer's bytes, not a copy of them.
    assert not decoded.flags.writeable
    body[:4] = np.array([7.0], "<f4").tobytes()
    assert decoded.tolist() == [7.0, 2.0]


def test_decode_reads_any_bytes_like() -> None:
    raw = np.arange(6, dtype="<i2").tobytes()
    for given_raw in (raw, bytearray(raw), memoryview(raw), memoryview(raw)[::1], memoryview(raw).cast("h")):
        decoded = decode_binary_tensor(given_raw, "INT16", (2, 3), "x")  # type: ignore[arg-type]
        assert decoded.tolist() == [[0, 1, 2], [3, 4, 5]] and not decoded.flags.writeable
    strided = memoryview(raw + raw)[::2]  # not contiguous: copied, then decoded
    assert decode_binary_tensor(strided, "UINT8", [12], "x").tolist() == list((raw + raw)[::2])
    strings = packed([b"ab", b""])
    for given_raw in (strings, bytearray(strings), memoryview(b"??" + strings)[2:]):
        decoded = decode_binary_tensor(given_raw, "BYTES", [2], "s")  # type: ignore[arg-type]
        assert decoded.tolist() == [b"ab", b""] and not decoded.flags.writeable


@pytest.mark.parametrize("datatype", list(ALL))
def test_decoded_tensors_are_read_only(datatype: str) -> None:
    decoded = decode_binary_tensor(encode_binary_tensor(ALL[datatype]), datatype, [2, 2], "x")
    with pytest.raises(ValueError, match="read-only"):
        decoded[0, 0] = decoded[1, 1]


def test_encode_writes_little_endian_c_order_whatever_the_layout() -> None:
    big = np.array([[1, 2], [3, 4]], dtype=">i4")
    assert encode_binary_tensor(big) == np.array([[1, 2], [3, 4]], "<i4").tobytes()
    transposed = np.arange(6, dtype=np.float64).reshape(2, 3).T
    assert encode_binary_tensor(transposed) == np.ascontiguousarray(transposed).astype("<f8").tobytes()
    assert encode_binary_tensor(np.arange(10, dtype=">u2")[::3]) == np.array([0, 3, 6, 9], "<u2").tobytes()
    assert encode_binary_tensor(np.float32(1.5)) == struct.pack("<f", 1.5)  # type: ignore[arg-type]


def test_encode_bytes_like_tritonclient() -> None:
    # bytes as they are, str as UTF-8, anything else as the UTF-8 of its str().
    mixed = objects(b"\xff", "ü", 7, 1.5, None, np.bytes_(b"n"), bytearray(b"ba"), memoryview(b"mv"))
    assert encode_binary_tensor(mixed) == packed(
        [b"\xff", "ü".encode(), b"7", b"1.5", b"None", b"n", b"ba", b"mv"]
    )
    assert encode_binary_tensor(np.array([b"ab", b"c"], dtype="S2")) == packed([b"ab", b"c"])
    assert encode_binary_tensor(np.array(["ab", "日本"], dtype="U2"), "BYTES") == packed(
        [b"ab", "日本".encode()]
    )
    assert encode_binary_tensor(np.array([], dtype=object)) == b""
    transposed = np.array([["a", "b"], ["c", "d"]], dtype=object).T
    assert encode_binary_tensor(transposed) == packed([b"a", b"c", b"b", b"d"])


def test_encode_refuses_a_datatype_that_disagrees_with_the_array() -> None:
    with pytest.raises(ValueError, match="is FP32, not FP64"):
        encode_binary_tensor(np.zeros(2, np.float32), "FP64")
    with pytest.raises(ValueError, match="is BYTES, not INT8"):
        encode_binary_tensor(np.array([b"a"], dtype=object), "INT8")
    with pytest.raises(InvalidInput, match="complex64 has no Open Inference Protocol datatype"):
        encode_binary_tensor(np.zeros(2, np.complex64))


@settings(max_examples=200, deadline=None, database=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([a.dtype for a in NUMERIC.values()])
        | st.sampled_from([np.dtype(">i4"), np.dtype(">f8"), np.dtype(">u2")]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)
def test_round_trip_property(array: np.ndarray) -> None:
    datatype = to_oip_datatype(array.dtype)
    decoded = decode_binary_tensor(encode_binary_tensor(array), datatype, array.shape, "x")
    assert decoded.dtype == array.dtype.newbyteorder("=") and not decoded.flags.writeable
    np.testing.assert_array_equal(decoded, array)


@settings(max_examples=200, deadline=None, database=None)
@given(
    values=st.lists(st.binary(max_size=20) | st.text(max_size=10), max_size=8),
)
def test_bytes_round_trip_property(values: list[bytes | str]) -> None:
    decoded = decode_binary_tensor(encode_binary_tensor(objects(*values)), "BYTES", [len(values)], "s")
    assert decoded.tolist() == [v.encode() if isinstance(v, str) else v for v in values]


# --- both transports ----------------------------------------------------------------------


def _rest_blobs(outputs: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, object]], dict[str, bytes]]:
    document = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
    call = v2_json.decode_infer_request(document.encode(), model="m")
    call = v2_json.InferCall(request=call.request, binary_default=True)
    body, header_length = v2_json.encode_infer_response(InferResponse("m", 1, outputs), call)
    assert header_length is not None
    header = json.loads(body[:header_length])
    offset, blobs, entries = header_length, {}, {}
    for entry in header["outputs"]:
        size = entry["parameters"]["binary_data_size"]
        blobs[entry["name"]] = body[offset : offset + size]
        entries[entry["name"]] = entry
        offset += size
    assert offset == len(body)
    return entries, blobs


def test_both_transports_encode_the_same_bytes() -> None:
    outputs = {
        **ALL,
        "big_endian": np.array([[1, -2]], dtype=">i8"),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
        "str_array": np.array(["a", "ü"], dtype="U1"),
        "mixed_objects": np.array([b"\xff", "é", 3], dtype=object),
    }
    entries, rest = _rest_blobs(outputs)
    grpc = pb.ModelInferResponse.FromString(
        v2_grpc.encode_infer_response(InferResponse("m", 1, outputs)).SerializeToString()
    )
    assert [o.name for o in grpc.outputs] == list(outputs) == list(rest)
    for tensor, raw in zip(grpc.outputs, grpc.raw_output_contents, strict=True):
        array = outputs[tensor.name]
        assert raw == rest[tensor.name] == encode_binary_tensor(array), tensor.name
        assert tensor.datatype == entries[tensor.name]["datatype"]
        assert list(tensor.shape) == entries[tensor.name]["shape"] == list(array.shape)
    assert rest["BYTES"] == packed(STRING_BYTES)
    assert rest["mixed_objects"] == packed([b"\xff", "é".encode(), b"3"])


def _decode_rest(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    call = v2_json.decode_infer_request(header + raw, model="m", header_length=len(header))
    return call.request.inputs["x"]


def _decode_grpc(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    wire = pb.ModelInferRequest.FromString(request.SerializeToString())
    return v2_grpc.decode_infer_request(wire).inputs["x"]


@pytest.mark.parametrize("datatype", list(ALL))
def test_both_transports_decode_the_same_array(datatype: str) -> None:
    raw = expected_raw(datatype, ALL[datatype])
    rest, grpc = _decode_rest(datatype, [2, 2], raw), _decode_grpc(datatype, [2, 2], raw)
    assert rest.dtype == grpc.dtype and rest.shape == grpc.shape == (2, 2)
    assert not rest.flags.writeable and not grpc.flags.writeable, "one behaviour: read-only"
    if datatype == "BYTES":
        assert rest.tolist() == grpc.tolist() == [STRING_BYTES[:2], STRING_BYTES[2:]]
    else:
        np.testing.assert_array_equal(rest, grpc)
        np.testing.assert_array_equal(rest, ALL[datatype])


# --- errors -------------------------------------------------------------------------------

ERRORS = [
    # (datatype, shape, raw, message fragments)
    (
        "FP32",
        [2, 2],
        b"\0" * 15,
        ["input 'x'", "raw content has 15 bytes", "[2, 2] of FP32 needs 16 bytes (4 x 4)"],
    ),
    ("FP32", [2, 2], b"\0" * 17, ["raw content has 17 bytes", "needs 16 bytes"]),
    ("FP16", [3], b"\0" * 4, ["raw content has 4 bytes", "[3] of FP16 needs 6 bytes (3 x 2)"]),
    ("INT64", [], b"", ["raw content has 0 bytes", "[] of INT64 needs 8 bytes (1 x 8)"]),
    ("UINT8", [0], b"\0", ["raw content has 1 byte,", "needs 0 bytes"]),
    ("BOOL", [3], b"\1\0\7", ["input 'x'", "BOOL element 2 is the byte 7", "0 (false) or 1 (true)"]),
    ("BOOL", [2], b"\1", ["raw content has 1 byte,", "needs 2 bytes"]),
    ("BF16", [1], b"\0\0", ["input 'x'", "unsupported datatype 'BF16'"]),
    ("fp32", [1], b"\0" * 4, ["unsupported datatype 'fp32'"]),
    ("FP32", [-1, 4], b"\0" * 16, ["input 'x'", "shape [-1, 4] has a negative dimension"]),
    # BYTES: too few elements, a cut-off length prefix, an element past the end, too many bytes.
    (
        "BYTES",
        [3],
        packed([b"a", b"b"]),
        ["input 'x'", "[3] needs 3 BYTES elements", "(10 bytes) ends after 2"],
    ),
    ("BYTES", [1], b"", ["needs 1 BYTES element,", "(0 bytes) ends after 0"]),
    (
        "BYTES",
        [2],
        packed([b"a"]) + b"\2\0",
        ["inside the 4-byte length prefix of BYTES element 1 of 2", "(2 bytes left)"],
    ),
    (
        "BYTES",
        [2],
        packed([b"ab"]) + struct.pack("<I", 5) + b"xyz",
        ["BYTES element 1 of 2 claims 5 bytes, but only 3 remain"],
    ),
    ("BYTES", [1], struct.pack("<I", 2**32 - 1), ["claims 4294967295 bytes, but only 0 remain"]),
    (
        "BYTES",
        [1],
        packed([b"a", b"b"]),
        ["raw content has 5 bytes left over after the 1 BYTES element of shape [1]"],
    ),
    ("BYTES", [0], b"\0", ["1 byte left over after the 0 BYTES elements"]),
    # A hostile shape is refused from the data, without allocating 2**40 elements first.
    ("BYTES", [2**20, 2**20], packed([b"a"]), ["needs 1099511627776 BYTES elements", "ends after 1"]),
    ("FP64", [2**31, 2**31], b"", ["needs 36893488147419103232 bytes"]),
]


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "fragments"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors_name_the_tensor_and_the_problem(
    datatype: str, shape: list[int], raw: bytes, fragments: list[str]
) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_binary_tensor(raw, datatype, shape, "x")
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "fragments"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_both_transports_reject_alike(
    datatype: str, shape: list[int], raw: bytes, fragments: list[str]
) -> None:
    with pytest.raises(InvalidInput) as direct:
        decode_binary_tensor(raw, datatype, shape, "x")
    messages = []
    for decode in (_decode_rest, _decode_grpc):
        with pytest.raises(InvalidInput) as info:
            decode(datatype, shape, raw)
        messages.append(info.value.message)
    # REST checks the datatype and the shape before the codec sees them, in its own words.
    if datatype in OIP_TO_NUMPY and all(d >= 0 for d in shape):
        assert messages == [direct.value.message] * 2


def test_shape_must_hold_integers() -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': shape \[2.0\] must hold integers"):
        decode_binary_tensor(b"\0" * 8, "FP32", [2.0], "x")  # type: ignore[list-item]


# --- tritonclient -------------------------------------------------------------------------

_TRITONCLIENT_SCRIPT = """
import json, sys
import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor
ours = json.loads(sys.stdin.read())
strings = np.array([["", b""], ["héllo wörld ✓", b"\\x00\\xff\\xfe"]], dtype=object)
decoded = deserialize_bytes_tensor(bytes.fromhex(ours["bytes"]))
print(json.dumps({
    "serialized": serialize_byte_tensor(strings).item().hex(),
    "decoded": [v.hex() for v in decoded],
    "fp16": np.frombuffer(bytes.fromhex(ours["fp16"]), np.float16).tolist(),
}))
"""


def test_tritonclient_reads_and_writes_the_same_bytes() -> None:
    ours = {"bytes": encode_binary_tensor(STRINGS).hex(), "fp16": encode_binary_tensor(NUMERIC["FP16"]).hex()}
    result = subprocess.run(
        [clients_python(), "-c", _TRITONCLIENT_SCRIPT],
        input=json.dumps(ours),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout)
    assert bytes.fromhex(theirs["serialized"]) == encode_binary_tensor(STRINGS)
    assert [bytes.fromhex(v) for v in theirs["decoded"]] == STRING_BYTES
    np.testing.assert_array_equal(np.array(theirs["fp16"], np.float16).reshape(2, 2), NUMERIC["FP16"])
