"""TF Serving REST JSON codec: golden payloads and every error branch."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest

from modelloop.errors import ErrorCode
from modelloop.serving.codecs import tfserving_json
from modelloop.serving.errors import InvalidInput, ModelNotFound
from modelloop.serving.types import (
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    TensorSpec,
    VersionStatus,
)

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"

DIGITS = ModelMetadata(
    name="digits",
    version=1,
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("pixels", np.dtype("float32"), (-1, 64)),),
    outputs=(TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),),
)
MULTI = ModelMetadata(
    name="multi",
    version=3,
    platform="fake",
    inputs=(
        TensorSpec("a", np.dtype("float32"), (-1, 2)),
        TensorSpec("n", np.dtype("int64"), (-1,)),
        TensorSpec("s", np.dtype("object"), (-1,)),
        TensorSpec("flag", np.dtype("bool"), (-1,)),
    ),
    outputs=(TensorSpec("y", np.dtype("float32"), (-1,)), TensorSpec("z", np.dtype("int64"), (-1, 2))),
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


def decode(body: object, metadata: ModelMetadata = DIGITS) -> tfserving_json.PredictRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return tfserving_json.decode_predict_request(raw, metadata, model=metadata.name)


def reject(body: object, match: str, metadata: ModelMetadata = MULTI) -> InvalidInput:
    with pytest.raises(InvalidInput, match=match) as info:
        decode(body, metadata)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value


def test_golden_row_request() -> None:
    body = golden("tfserving-predict-request.json")
    call = tfserving_json.decode_predict_request(
        body, DIGITS, model="digits", version=1, label=None, request_id="abc"
    )
    expected = np.array(json.loads(body)["instances"], dtype=np.float32)
    assert call.row_format
    req = call.request
    assert (req.model, req.version, req.id, req.protocol) == ("digits", 1, "abc", Protocol.TFSERVING_REST)
    assert req.signature_name == "serving_default"
    assert req.inputs["pixels"].dtype == np.float32
    np.testing.assert_array_equal(req.inputs["pixels"], expected)


def test_golden_columnar_request_equals_row_request() -> None:
    row = decode(golden("tfserving-predict-request.json"))
    col = decode(golden("tfserving-predict-columnar-request.json"))
    assert not col.row_format
    np.testing.assert_array_equal(row.request.inputs["pixels"], col.request.inputs["pixels"])


def test_golden_row_response() -> None:
    response = InferResponse("digits", 1, {"probabilities": GOLDEN_PROBS})
    body = tfserving_json.encode_predict_response(response, row_format=True)
    assert json.loads(body) == json.loads(golden("tfserving-predict-response.json"))


def test_columnar_response_single_output_is_plain_tensor() -> None:
    response = InferResponse("digits", 1, {"probabilities": GOLDEN_PROBS})
    body = json.loads(tfserving_json.encode_predict_response(response, row_format=False))
    assert body == {"outputs": GOLDEN_PROBS.tolist()}


def test_multi_output_responses() -> None:
    outputs = {"y": np.array([1.5, 2.5], np.float32), "z": np.array([[1, 2], [3, 4]], np.int64)}
    response = InferResponse("multi", 3, outputs)
    rows = json.loads(tfserving_json.encode_predict_response(response, row_format=True))
    assert rows == {"predictions": [{"y": 1.5, "z": [1, 2]}, {"y": 2.5, "z": [3, 4]}]}
    cols = json.loads(tfserving_json.encode_predict_response(response, row_format=False))
    assert cols == {"outputs": {"y": [1.5, 2.5], "z": [[1, 2], [3, 4]]}}


def test_row_response_with_different_batch_dims_is_refused() -> None:
    outputs = {"y": np.array([1.0], np.float32), "z": np.array([[1, 2], [3, 4]], np.int64)}
    with pytest.raises(InvalidInput, match="columnar"):
        tfserving_json.encode_predict_response(InferResponse("m", 1, outputs), row_format=True)


def test_nan_and_infinity_round_trip() -> None:
    call = decode(b'{"instances": [[NaN, Infinity, -Infinity] ]}', DIGITS)
    x = call.request.inputs["pixels"]
    assert math.isnan(x[0, 0]) and x[0, 1] == np.inf and x[0, 2] == -np.inf
    body = tfserving_json.encode_predict_response(InferResponse("d", 1, {"p": x}), row_format=True)
    assert b"NaN" in body and b"-Infinity" in body
    assert math.isnan(json.loads(body)["predictions"][0][0])


def test_bytes_outputs_text_and_b64() -> None:
    text = np.array([b"seven", b"eight"], dtype=object)
    blob = np.array([b"\x00\xff"], dtype=object)
    body = tfserving_json.encode_predict_response(InferResponse("m", 1, {"label": text}), row_format=True)
    assert json.loads(body) == {"predictions": ["seven", "eight"]}
    body = tfserving_json.encode_predict_response(
        InferResponse("m", 1, {"image_bytes": blob}), row_format=False
    )
    assert json.loads(body) == {"outputs": [{"b64": base64.b64encode(b"\x00\xff").decode()}]}


def test_multi_input_rows_with_b64_bool_and_int() -> None:
    body = {
        "instances": [
            {"a": [1, 2.5], "n": 7, "s": {"b64": base64.b64encode(b"\x01\x02").decode()}, "flag": True},
            {"a": [3, 4], "n": 8.0, "s": "text", "flag": False},
        ]
    }
    inputs = decode(body, MULTI).request.inputs
    np.testing.assert_array_equal(inputs["a"], np.array([[1, 2.5], [3, 4]], np.float32))
    assert inputs["n"].dtype == np.int64 and inputs["n"].tolist() == [7, 8]
    assert inputs["s"].tolist() == [b"\x01\x02", b"text"]
    assert inputs["flag"].dtype == np.bool_ and inputs["flag"].tolist() == [True, False]


def test_columnar_named_inputs_may_differ_in_batch() -> None:
    inputs = decode({"inputs": {"a": [[1, 2]], "n": [1, 2, 3]}}, MULTI).request.inputs
    assert inputs["a"].shape == (1, 2) and inputs["n"].shape == (3,)


def test_single_input_model_accepts_named_rows_and_b64_rows() -> None:
    named = decode({"instances": [{"pixels": [1.0] * 64}]}).request.inputs["pixels"]
    assert named.shape == (1, 64)
    meta = ModelMetadata("t", 1, "fake", (TensorSpec("s", np.dtype(object), (-1,)),), ())
    rows = decode({"instances": [{"b64": "aGk="}, "yo"]}, meta).request.inputs["s"]
    assert rows.tolist() == [b"hi", b"yo"]
    scalar = decode({"inputs": {"b64": "aGk="}}, meta).request.inputs["s"]
    assert scalar.shape == () and scalar.item() == b"hi"


def test_signature_name() -> None:
    assert decode({"signature_name": "", "instances": [[0.0] * 64]}).request.signature_name == (
        "serving_default"
    )
    with pytest.raises(ModelNotFound) as info:
        decode({"signature_name": "predict_images", "instances": [[0.0] * 64]})
    assert str(info.value) == 'Serving signature name: "predict_images" not found in signature def'
    assert info.value.code is ErrorCode.NOT_FOUND
    reject({"signature_name": 3, "instances": [[0.0] * 64]}, "signature_name", DIGITS)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({"instances": [[0.0] * 64], "inputs": [[0.0] * 64]}, "both"),
        ({"signature_name": "serving_default"}, '"instances".*or "inputs"'),
        ({"instances": {"pixels": [0.0]}}, "must be a list of rows"),
        ({"instances": []}, "empty batch"),
        ({"inputs": []}, "empty batch"),
        ({"inputs": {"pixels": []}}, "empty batch"),
        ({"inputs": {}}, "empty object"),
        ({"instances": [[1.0, 2.0], [3.0]]}, "ragged"),
        ({"instances": [[1.0, 2.0], 3.0]}, "mixes lists and scalars"),
        ({"instances": [[1.0, "2"]]}, r'expects numbers \(float32\) but got a string \("2"\)'),
        ({"instances": [[1.0, None]]}, "but got null"),
        ({"instances": [[1.0, True]]}, r"but got a boolean \(true\)"),
        ({"instances": [[1.0, {"b64": "AA=="}]]}, "but got an object"),
        ({"instances": [[1e300]]}, "out of range for float32"),
        ({"instances": [{"pixels": [1.0]}, {"pixels": [2.0], "other": [1.0]}]}, "adds other"),
        ({"instances": [{"pixels": [1.0]}, [2.0]]}, "same form"),
        ({"instances": [{"nope": [1.0]}]}, 'unknown input "nope"'),
        ({"inputs": {"nope": [1.0]}}, 'unknown input "nope"'),
    ],
)
def test_bad_requests_for_single_input(body: object, match: str) -> None:
    reject(body, match, DIGITS)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"instances": [[1.0, 2.0]]}, "must be an object keyed by input name"),
        ({"inputs": [[1.0, 2.0]]}, '"inputs" must be an object keyed by input name'),
        ({"instances": [{"a": [1, 2], "n": 1}, {"a": [1, 2]}]}, "instances\\[1\\] lacks n"),
        ({"inputs": {"n": [1.5]}}, r"expects integers \(int64\) but got 1.5"),
        ({"inputs": {"n": [2**70]}}, "out of range for int64"),
        ({"inputs": {"flag": [1]}}, r"expects booleans \(BOOL\) but got int"),
        ({"inputs": {"s": [1]}}, "expects strings or"),
        ({"inputs": {"s": [{"b64": "!!!"}]}}, "invalid base64"),
        ({"inputs": {"s": [{"b64": 5}]}}, "must be a base64 string"),
    ],
)
def test_bad_requests_for_multi_input(body: object, match: str) -> None:
    reject(body, match, MULTI)


def test_golden_status() -> None:
    statuses = [
        VersionStatus(2, ModelState.AVAILABLE),
        VersionStatus(1, ModelState.FAILED, "model.onnx is corrupt"),
    ]
    body = tfserving_json.encode_model_status(statuses)
    assert json.loads(body) == json.loads(golden("tfserving-status-response.json"))


def test_golden_metadata() -> None:
    body = tfserving_json.encode_model_metadata(DIGITS)
    assert json.loads(body) == json.loads(golden("tfserving-metadata-response.json"))


def test_metadata_of_every_dtype() -> None:
    body = json.loads(tfserving_json.encode_model_metadata(MULTI))
    inputs = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert {k: v["dtype"] for k, v in inputs.items()} == {
        "a": "DT_FLOAT",
        "n": "DT_INT64",
        "s": "DT_STRING",
        "flag": "DT_BOOL",
    }
    assert body["model_spec"]["version"] == "3"
