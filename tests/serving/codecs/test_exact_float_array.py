"""Float tensors of plain numbers are built in one NumPy call, with the same result as the checks.

``exact_float_array`` answers only where it is sure; everywhere else the decoders take the
checking path (``flatten_nested`` and ``leaves_to_array``). Hypothesis sends nested lists of
every kind of JSON leaf through both, for float32 and float64 inputs, and through the two
decoders with and without the one-call path: the array (values, dtype, shape) or the error
message must be the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelloop.serving.codecs import json_tensor, tfserving_json, v2_json
from modelloop.serving.errors import InvalidInput
from modelloop.serving.types import ModelMetadata, TensorSpec

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)

number = st.one_of(
    st.integers(-(2**60), 2**60),
    st.integers(-(2**25), 2**25),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.floats(-1e6, 1e6),
)
leaf = st.one_of(number, number, number, st.booleans(), st.none(), st.text(max_size=3))
rows = st.integers(1, 3).flatmap(
    lambda width: st.lists(st.lists(leaf, min_size=width, max_size=width), min_size=1, max_size=3)
)
ragged = st.lists(st.lists(number, min_size=1, max_size=3), min_size=2, max_size=3)
tensor = st.one_of(rows, ragged, st.lists(number, max_size=4), st.lists(st.lists(st.lists(number))))


def _checked(value: Any, dtype: np.dtype) -> np.ndarray | str:
    try:
        shape, leaves = json_tensor.flatten_nested(value, "x")
        return json_tensor.leaves_to_array(leaves, shape, dtype, "x")
    except InvalidInput as error:
        return str(error)


def _same(a: np.ndarray | str, b: np.ndarray | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@FUZZ
@given(value=tensor, dtype=st.sampled_from([np.dtype("float32"), np.dtype("float64")]))
def test_the_one_call_array_is_the_checked_array(value: Any, dtype: np.dtype) -> None:
    value = orjson.loads(orjson.dumps(value))  # what a parsed body holds
    fast = json_tensor.exact_float_array(value, dtype)
    body = orjson.dumps(value)
    if fast is None or not json_tensor.has_no_booleans(body):
        return
    assert _same(fast, _checked(value, dtype)), (value, fast)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ([[1.0, "2"]], "text"),
        ([[1.0, None]], "null"),
        ([[1.0], [2.0, 3.0]], "ragged"),
        ([[16777217, 1.0]], "an integer float32 rounds"),
        ([[1e39]], "beyond float32"),
        ([[float("nan")]], "NaN"),
        ([[]], "empty"),
        ([[True, False]], "booleans only"),
        ([[{"b64": "AA=="}]], "an object"),
        (3.0, "a scalar"),
    ],
)
def test_what_it_cannot_vouch_for_goes_to_the_checks(value: Any, why: str) -> None:
    assert json_tensor.exact_float_array(value, np.dtype("float32")) is None, why


def test_an_integer_input_always_goes_to_the_checks() -> None:
    assert json_tensor.exact_float_array([[1, 2]], np.dtype("int32")) is None
    assert json_tensor.exact_float_array([[1.0, 2.0]], np.dtype("float16")) is None


def test_a_body_with_a_boolean_anywhere_is_not_numbers_only() -> None:
    assert json_tensor.has_no_booleans(b'{"instances": [[1.0, 2.5]]}')
    assert not json_tensor.has_no_booleans(b'{"instances": [[1.0, true]]}')
    assert not json_tensor.has_no_booleans(b'{"inputs": [], "parameters": {"binary_data_output": false}}')


METADATA = ModelMetadata(
    name="m",
    version=1,
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("x", np.dtype("float32"), (-1, -1)),),
    outputs=(TensorSpec("y", np.dtype("float32"), (-1, 1)),),
)


def _decoded(decode: Any, body: bytes) -> np.ndarray | str:
    try:
        return decode(body)
    except InvalidInput as error:
        return str(error)


def _tfserving(body: bytes) -> np.ndarray:
    return tfserving_json.decode_predict_request(body, METADATA, model="m").request.inputs["x"]


def _oip(body: bytes) -> np.ndarray:
    return v2_json.decode_infer_request(body, model="m").request.inputs["x"]


def _oip_body(value: Any, shape: list[int]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": value}]})


@FUZZ
@given(value=tensor, shape=st.lists(st.integers(0, 4), min_size=1, max_size=2))
def test_both_decoders_answer_the_same_with_and_without_the_one_call_path(
    value: Any, shape: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = [
        (_tfserving, orjson.dumps({"instances": value})),
        (_tfserving, orjson.dumps({"inputs": {"x": value}})),
        (_oip, _oip_body(value, shape)),
    ]
    for decode, body in cases:
        fast = _decoded(decode, body)
        with monkeypatch.context() as patched:
            patched.setattr(tfserving_json, "exact_float_array", lambda *_: None)
            patched.setattr(v2_json, "exact_float_array", lambda *_: None)
            checked = _decoded(decode, body)
        assert _same(fast, checked), (body, fast, checked)


def test_the_one_call_path_is_taken_for_rows_of_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    def checks(*args: Any) -> Any:
        raise AssertionError("the checking path ran")

    monkeypatch.setattr(tfserving_json, "flatten_nested", checks)
    monkeypatch.setattr(v2_json, "flatten_nested", checks)
    array = _tfserving(b'{"instances": [[1, 2.5], [3, 4]]}')
    assert array.dtype == np.float32 and array.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert _oip(_oip_body([1, 2.5, 3, 4], [2, 2])).tolist() == [[1.0, 2.5], [3.0, 4.0]]
    with pytest.raises(AssertionError, match="checking path"):
        _tfserving(b'{"instances": [[1, true]]}')
