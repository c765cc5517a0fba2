"""TF Serving's own REST JSON test vectors, run through our codec.

Every request, response and error below is copied from TensorFlow Serving's unit tests of
its JSON codec, ``tensorflow_serving/util/json_tensor_test.cc`` (tensorflow/serving at
commit 07451ec6d73019beb7a658a395b3b11a562911df, Apache License 2.0); each case names the
``TEST(JsontensorTest, ...)`` it comes from. The expected tensors are TF Serving's
``EqualsProto`` expectations, written here as dtype, shape and values.

Where we answer differently, the case says so and why (docs/compatibility.md lists every
difference): error messages are our own wording but name the same problem,
``classify``/``regress`` bodies are not decoded (those routes answer 501), and floats are
written as the shortest text that reads back to the same float32, where TF Serving writes
six significant digits (``9e+06``); the values are equal.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import pytest

from modelloop.errors import ErrorCode
from modelloop.serving.codecs import tfserving_json
from modelloop.serving.errors import InvalidInput
from modelloop.serving.rest.errors import error_response
from modelloop.serving.types import InferResponse, ModelMetadata, Protocol, TensorSpec

# TF Serving's DataType names to our dtypes; DT_STRING is bytes (object).
DTYPES = {"DT_INT32": "int32", "DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_STRING": "object"}


def signature(**inputs: str) -> ModelMetadata:
    """A model whose signature has these inputs (name to TF dtype), as TF's `infomap`."""
    specs = tuple(TensorSpec(name, np.dtype(DTYPES[dtype]), (-1,)) for name, dtype in inputs.items())
    return ModelMetadata(name="m", version=1, platform="tensorflow", inputs=specs, outputs=specs)


def decode(body: str, metadata: ModelMetadata) -> tfserving_json.PredictRequest:
    return tfserving_json.decode_predict_request(body.encode(), metadata, model="m")


def tensor(dtype: str, shape: list[int], values: list[Any]) -> np.ndarray:
    """The tensor of an ``EqualsProto`` expectation."""
    if dtype == "DT_STRING":
        return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object).reshape(
            shape
        )
    return np.array(values, dtype=DTYPES[dtype]).reshape(shape)


def same(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    if got.dtype.kind == "f":
        np.testing.assert_array_equal(got, expected)  # NaN == NaN here
    else:
        assert got.tolist() == expected.tolist()


# -- requests -------------------------------------------------------------------------------

DECODE_CASES: list[tuple[str, dict[str, str], str, bool, dict[str, np.ndarray]]] = [
    (
        "SingleUnnamedTensor",
        {"default": "DT_INT32"},
        '{"instances": [[1,2],[3,4],[5,6]]}',
        True,
        {"default": tensor("DT_INT32", [3, 2], [1, 2, 3, 4, 5, 6])},
    ),
    (
        "MixedInputForFloatTensor",
        {"default": "DT_FLOAT"},
        '{"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}',
        True,
        {"default": tensor("DT_FLOAT", [7], [1, 2.0, 3, 4, 5.003, 0.007, 0.0])},
    ),
    (
        "MixedInputForDoubleTensor",
        {"default": "DT_DOUBLE"},
        '{"instances": [1.0, 2, 3, 4, 0.662, 0, 0.0]}',
        True,
        {"default": tensor("DT_DOUBLE", [7], [1.0, 2, 3, 4, 0.662, 0, 0.0])},
    ),
    (
        # TensorFromNonNullTerminatedBuffer reads the same document from a buffer without a
        # terminating NUL; Python bytes have none, so it is this case again.
        "SingleUnnamedTensorBase64Scalars",
        {"default": "DT_STRING"},
        '{"instances": [ { "b64" : "aGVsbG8=" }, { "b64": "d29ybGQ=" } ]}',
        True,
        {"default": tensor("DT_STRING", [2], ["hello", "world"])},
    ),
    (
        "SingleUnnamedTensorBase64Lists",
        {"default": "DT_STRING"},
        '{"instances": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}',
        True,
        {"default": tensor("DT_STRING", [2, 1], ["hello", "world"])},
    ),
    (
        "SingleNamedTensorBase64",
        {"default": "DT_STRING"},
        '{"instances": [{"default": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}]}',
        True,
        {"default": tensor("DT_STRING", [1, 2, 1], ["hello", "world"])},
    ),
    (
        "MultipleNamedTensor",
        {
            "int_tensor": "DT_INT32",
            "str_tensor": "DT_STRING",
            "float_tensor": "DT_FLOAT",
            "dbl_tensor": "DT_DOUBLE",
        },
        """{"instances": [
            {"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"],
             "float_tensor": [1.0, NaN], "dbl_tensor": [NaN]},
            {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"],
             "float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}]}""",
        True,
        {
            "int_tensor": tensor("DT_INT32", [2, 3, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]),
            "str_tensor": tensor("DT_STRING", [2, 2], ["foo", "bar", "baz", "bat"]),
            "float_tensor": tensor("DT_FLOAT", [2, 2], [1.0, math.nan, 2.0, math.inf]),
            "dbl_tensor": tensor("DT_DOUBLE", [2, 1], [math.nan, 2.0]),
        },
    ),
    (
        "SingleUnnamedTensorColumnarFormat",
        {"int_tensor": "DT_INT32"},
        '{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]]}}',
        False,
        {"int_tensor": tensor("DT_INT32", [1, 3, 2], [1, 2, 3, 4, 5, 6])},
    ),
    (
        "SingleUnnamedTensorColumnarFormat (input name skipped)",
        {"int_tensor": "DT_INT32"},
        '{"inputs": [[[1,2],[3,4],[5,6]]]}',
        False,
        {"int_tensor": tensor("DT_INT32", [1, 3, 2], [1, 2, 3, 4, 5, 6])},
    ),
    (
        "MultipleNamedTensorColumnarFormat",
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING", "bin_tensor": "DT_STRING"},
        """{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]], "str_tensor": ["foo", "bar"],
                       "bin_tensor": { "b64" : "aGVsbG8=" }}}""",
        False,
        {
            "int_tensor": tensor("DT_INT32", [1, 3, 2], [1, 2, 3, 4, 5, 6]),
            "str_tensor": tensor("DT_STRING", [2], ["foo", "bar"]),
            "bin_tensor": tensor("DT_STRING", [], ["hello"]),
        },
    ),
]


@pytest.mark.parametrize(
    ("case", "infomap", "body", "row", "expected"), DECODE_CASES, ids=[c[0] for c in DECODE_CASES]
)
def test_tf_serving_request_vectors(
    case: str, infomap: dict[str, str], body: str, row: bool, expected: dict[str, np.ndarray]
) -> None:
    call = decode(body, signature(**infomap))
    assert call.row_format is row
    assert call.request.protocol is Protocol.TFSERVING_REST
    assert set(call.request.inputs) == set(expected)
    for name, want in expected.items():
        same(call.request.inputs[name], want)


def test_tf_serving_signature_name_vector() -> None:
    # SingleUnnamedTensorWithSignature: the signature is taken from the body.
    metadata = ModelMetadata(
        name="m",
        version=1,
        platform="tensorflow",
        inputs=(TensorSpec("default", np.dtype("int32"), (-1, 2)),),
        outputs=(TensorSpec("y", np.dtype("int32"), (-1,)),),
        signature_name="predict_images",
    )
    call = decode('{"signature_name": "predict_images", "instances": [[1,2]]}', metadata)
    assert call.request.signature_name == "predict_images"
    same(call.request.inputs["default"], tensor("DT_INT32", [1, 2], [1, 2]))


# TF Serving's error substring, and ours. Ours names the same problem in our words; where the
# wording differs, TF's message describes its parser's state ("Expecting tensor size"), ours
# says what is wrong with the request.
ERROR_CASES: list[tuple[str, dict[str, str], str, str, str]] = [
    ("SingleUnnamedTensorErrors", {"default": "DT_INT32"}, "", "document is empty", "empty document"),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_INT32"},
        '{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}',
        "must be a string value",
        r'"signature_name" must be a string, got int \(5\)',
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_INT32"},
        '{"instances": [[1,2],[3,4],[5,6,7]], "inputs": [[1,2],[3,4],[5,6,7]]}',
        "Not formatted correctly",
        'both "instances" \\(row format\\) and "inputs" \\(columnar format\\)',
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_INT32"},
        '{"instances": [[1,2],[3,4],[5,6,7]]}',
        "Expecting tensor size",
        r"ragged: lists at depth 2 have different lengths \(2 and 3\)",
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_INT32"},
        '{"instances": [[1,2],[3,4],[[5,6]]]}',
        "Expecting shape",
        r"ragged: lists at depth 2 have different lengths \(2 and 1\)",
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_INT32"},
        '{"instances": [1, [1]]}',
        "Expecting shape",
        "mixes lists and scalars at depth 1",
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_INT32"},
        '{"instances": [[1,2],["a", "b"]]}',
        "not of expected type",
        r'expects numbers \(int32\) but got a string \("a"\)',
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_FLOAT"},
        '{ "instances": [1.7976931348623157e+308] }',  # std::numeric_limits<double>::max()
        "loss of precision",
        "out of range for float32",
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_FLOAT"},
        '{ "instances": [16777217] }',
        "loss of precision",
        "16777217 cannot be converted to float32 without loss of precision",
    ),
    (
        "SingleUnnamedTensorErrors",
        {"default": "DT_DOUBLE"},
        '{ "instances": [9007199254740993] }',
        "loss of precision",
        "9007199254740993 cannot be converted to float64 without loss of precision",
    ),
    (
        "MultipleNamedTensorErrors",
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING"},
        """{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]},
                          {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}""",
        "Expecting shape",
        r'input "int_tensor" \("instances"\) is ragged',
    ),
    (
        "MultipleNamedTensorErrors",
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING"},
        """{"instances": [{"int_tensor": [[1,2],[3,4],[5,6],[7,8]], "str_tensor": ["foo", "bar"]},
                          {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"]}]}""",
        "Expecting tensor size",
        r'input "int_tensor" \("instances"\) is ragged: lists at depth 2 have different lengths \(4 and 3\)',
    ),
    (
        "MultipleNamedTensorErrors",
        {"int_tensor": "DT_INT32", "str_tensor": "DT_STRING"},
        """{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]},
                          [1, 20, 30],
                          {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}""",
        "Expecting object but got list",
        r"instances\[1\] is a list, but instances\[0\] is an object",
    ),
    (
        "MultipleNamedTensorErrors",
        {"str_tensor": "DT_STRING"},
        '{"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}',
        "Expecting value/list but got object",
        r"instances\[1\] is an object, but instances\[0\] is a list",
    ),
]


@pytest.mark.parametrize(
    ("case", "infomap", "body", "tf_says", "we_say"), ERROR_CASES, ids=[f"{c[0]}-{c[3]}" for c in ERROR_CASES]
)
def test_tf_serving_error_vectors(
    case: str, infomap: dict[str, str], body: str, tf_says: str, we_say: str
) -> None:
    with pytest.raises(InvalidInput, match=we_say) as info:
        decode(body, signature(**infomap))
    # INVALID_ARGUMENT, as TF Serving's errors::IsInvalidArgument: HTTP 400.
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


# -- responses ------------------------------------------------------------------------------


def respond(outputs: dict[str, np.ndarray], row: bool) -> Any:
    response = InferResponse(model="m", version=1, outputs=outputs, id="r")
    return json.loads(tfserving_json.encode_predict_response(response, row))  # json reads NaN/Infinity


INT_2x3x2 = tensor("DT_INT32", [2, 3, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
HELLO_BYTES = tensor("DT_STRING", [2, 2], ["hello", "world", "tf", "serving"])


def test_from_json_single_tensor() -> None:
    # FromJsonSingleTensor
    nested = [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]]
    assert respond({"int_tensor": INT_2x3x2}, row=True) == {"predictions": nested}
    assert respond({"int_tensor": INT_2x3x2}, row=False) == {"outputs": nested}


def test_from_json_single_scalar_tensor() -> None:
    # FromJsonSingleScalarTensor
    ints = tensor("DT_INT32", [5], [1, 2, 3, 4, 5])
    assert respond({"int_tensor": ints}, row=True) == {"predictions": [1, 2, 3, 4, 5]}
    assert respond({"int_tensor": ints}, row=False) == {"outputs": [1, 2, 3, 4, 5]}


def test_from_json_single_bytes_tensor() -> None:
    # FromJsonSingleBytesTensor: an output whose name ends in "_bytes" is written as {"b64": ...}.
    assert respond({"str_tensor_bytes": HELLO_BYTES}, row=True) == {
        "predictions": [
            [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
            [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}],
        ]
    }


def test_from_json_single_float_tensor_six_digit_precision() -> None:
    # FromJsonSingleFloatTensorSixDigitPrecision compares text: TF Serving writes
    # [[9e+06, 999999.0, 0.5], [0.0003, 3e-05, 555557.5]]. We write the shortest text that
    # reads back as the same float32 (9000000.0, ...): the same numbers, compared as numbers.
    floats = tensor("DT_FLOAT", [2, 3], [9000000, 999999, 0.50000, 0.0003, 0.00003, 555557.5])
    answer = respond({"float_tensor": floats}, row=True)["predictions"]
    expected = json.loads("[[9e+06, 999999.0, 0.5], [0.0003, 3e-05, 555557.5]]")
    assert np.array(answer, dtype=np.float32).tolist() == np.array(expected, dtype=np.float32).tolist()


def test_from_json_single_float_tensor_non_finite() -> None:
    # FromJsonSingleFloatTensorNonFinite: the NaN and Infinity tokens, as TF Serving writes them.
    floats = tensor("DT_FLOAT", [2, 2], [math.nan, math.inf, 3, -math.inf])
    response = InferResponse(model="m", version=1, outputs={"float_tensor": floats}, id="r")
    text = tfserving_json.encode_predict_response(response, True).decode()
    assert text.replace(" ", "") == '{"predictions":[[NaN,Infinity],[3.0,-Infinity]]}'


def test_from_json_single_tensor_errors() -> None:
    # FromJsonSingleTensorErrors: a complex64 output cannot be written as JSON ("tensor type:
    # complex64"). (The empty tensor map and a tensor without shape cannot happen here: a
    # signature always has outputs, and an array always has a shape.)
    complex_output = np.array([1.0 + 0j, 2.0 + 0j], dtype=np.complex64)
    with pytest.raises(InvalidInput, match="output 'tensor' has tensor type complex64") as info:
        respond({"tensor": complex_output}, row=True)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_from_json_multiple_named_tensors() -> None:
    # FromJsonMultipleNamedTensors
    outputs = {
        "int_tensor": INT_2x3x2,
        "str_tensor": tensor("DT_STRING", [2, 2], ["foo", "bar", "baz", "bat"]),
        "float_tensor": tensor("DT_FLOAT", [2, 1], [1.0, 2.0]),
        "double_scalar_tensor": tensor("DT_DOUBLE", [2], [8.0, 9.0]),
        "str_tensor_bytes": HELLO_BYTES,
    }
    assert respond(outputs, row=True) == {
        "predictions": [
            {
                "double_scalar_tensor": 8.0,
                "float_tensor": [1.0],
                "int_tensor": [[1, 2], [3, 4], [5, 6]],
                "str_tensor": ["foo", "bar"],
                "str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
            },
            {
                "double_scalar_tensor": 9.0,
                "float_tensor": [2.0],
                "int_tensor": [[7, 8], [9, 0], [1, 2]],
                "str_tensor": ["baz", "bat"],
                "str_tensor_bytes": [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}],
            },
        ]
    }
    assert respond(outputs, row=False) == {
        "outputs": {
            "double_scalar_tensor": [8.0, 9.0],
            "float_tensor": [[1.0], [2.0]],
            "int_tensor": [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]],
            "str_tensor": [["foo", "bar"], ["baz", "bat"]],
            "str_tensor_bytes": [
                [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
                [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}],
            ],
        }
    }


@pytest.mark.parametrize(
    "outputs",
    [
        # FromJsonMultipleNamedTensorsErrors
        {
            "int_tensor": tensor("DT_INT32", [2, 3], [1, 2, 3, 4, 5, 6]),
            "str_tensor": tensor("DT_STRING", [1, 3], ["foo", "bar", "baz"]),
        },
        # FromJsonMultipleZeroBatchTensorsErrors
        {
            "int_tensor": np.zeros((0, 2), dtype=np.int32),
            "str_tensor": tensor("DT_STRING", [1, 2], ["foo", "bar"]),
        },
    ],
    ids=["FromJsonMultipleNamedTensorsErrors", "FromJsonMultipleZeroBatchTensorsErrors"],
)
def test_row_format_needs_one_batch_size(outputs: dict[str, np.ndarray]) -> None:
    # TF Serving: "inconsistent batch size"; ours names the fix as well.
    with pytest.raises(InvalidInput, match="different 0-th dimensions, which the row format cannot express"):
        respond(outputs, row=True)


def test_from_json_zero_batch_tensors() -> None:
    # FromJsonSingleZeroBatchTensor and FromJsonMultipleZeroBatchTensors
    assert respond({"int_tensor": np.zeros((0, 2), dtype=np.int32)}, row=True) == {"predictions": []}
    outputs = {
        "str_tensor": np.empty((0, 1, 2), dtype=object),
        "float_tensor": np.zeros((0, 3, 4), dtype=np.float32),
    }
    assert respond(outputs, row=True) == {"predictions": []}


@pytest.mark.parametrize("message", ['Bad key: "key"', "Bad key: 'key'"])
def test_error_body_escapes_quotes(message: str) -> None:
    # MakeJsonFromTensors.StatusError: {"error": ...} with the message escaped.
    response = error_response(message, 400)
    assert json.loads(response.body) == {"error": message}


def test_b64_round_trip_of_every_byte() -> None:
    # Not a TF Serving vector: the b64 wrapper carries any bytes, both ways.
    payload = bytes(range(256))
    encoded = base64.b64encode(payload).decode()
    call = decode(json.dumps({"instances": [{"b64": encoded}]}), signature(default="DT_STRING"))
    assert call.request.inputs["default"].tolist() == [payload]
    answer = respond({"out_bytes": call.request.inputs["default"]}, row=True)
    assert answer == {"predictions": [{"b64": encoded}]}


def test_a_decimal_beyond_the_exact_integers_is_rounded_as_asked() -> None:
    # The other side of TF Serving's IsLosslessDecimal: only integers must be exact; a
    # decimal is a request for the nearest float, as in any JSON parser.
    call = decode('{"instances": [16777217.0, 16777215, -16777215]}', signature(default="DT_FLOAT"))
    assert call.request.inputs["default"].tolist() == [16777216.0, 16777215.0, -16777215.0]
    with pytest.raises(InvalidInput, match="-16777217 cannot be converted to float32"):
        decode('{"instances": [1.5, -16777217]}', signature(default="DT_FLOAT"))
    call = decode('{"instances": [9007199254740991]}', signature(default="DT_DOUBLE"))
    assert call.request.inputs["default"].tolist() == [9007199254740991.0]
