"""JSON helpers shared by the REST codecs: parsing, nested lists to arrays, arrays to JSON.

Both ``tfserving_json`` and ``v2_json`` carry tensors as (nested) JSON lists. This module
turns such a list into a NumPy array of a known dtype, naming the exact problem when the
list is ragged or holds the wrong kind of value, and serialises arrays back with orjson.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from modelloop.serving.errors import InvalidInput

if TYPE_CHECKING:
    from modelloop.serving.types import TensorSpec

_ORJSON_NUMPY = orjson.OPT_SERIALIZE_NUMPY
# Dtypes orjson serialises straight from the array buffer (no Python objects per element).
_ORJSON_KINDS = frozenset("iuf")


def loads_json(body: bytes, what: str = "request body") -> Any:
    """Parses JSON, accepting the ``NaN``/``Infinity`` tokens TF Serving documents.

    orjson is fast but strict (RFC 8259 has no NaN), so a document it refuses is parsed
    again with the standard library, which knows those tokens.

    Args:
        body: The raw bytes.
        what: What the bytes are, for the error message. Defaults to ``"request body"``.

    Returns:
        The parsed document.

    Raises:
        InvalidInput: The bytes are not JSON.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as strict_error:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidInput(f"malformed JSON in {what}: {strict_error}") from None


def dumps_json(document: Any, *, non_finite: bool = False) -> bytes:
    """Serialises a document that may hold NumPy arrays (see :func:`array_to_json`).

    Args:
        document: Dicts, lists, scalars and NumPy arrays.
        non_finite: Whether a tensor in it holds NaN or an infinity. orjson would write
            those as ``null``, so then the standard library writes the document, with
            the ``NaN``/``Infinity`` tokens TF Serving emits. Defaults to False.

    Returns:
        UTF-8 JSON.
    """
    if not non_finite:
        try:
            return orjson.dumps(document, option=_ORJSON_NUMPY)
        except orjson.JSONEncodeError:
            pass  # e.g. an integer beyond 64 bits: the standard library copes
    return json.dumps(document, default=_to_list, separators=(",", ":")).encode()


def _to_list(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def array_to_json(array: np.ndarray) -> tuple[Any, bool]:
    """Prepares one tensor for :func:`dumps_json`.

    Numeric and bool arrays stay arrays (orjson writes them from the buffer); bytes
    become text, since JSON has no bytes.

    Args:
        array: Any array.

    Returns:
        The value to put in the document, and whether it holds NaN or an infinity.
    """
    kind = array.dtype.kind
    if kind == "O" or kind in "SU":
        flat = [_bytes_to_text(v) for v in array.ravel().tolist()]
        if array.ndim == 0:
            return flat[0], False
        return np.array(flat, dtype=object).reshape(array.shape).tolist(), False
    non_finite = kind in "fc" and not np.isfinite(array).all()
    if array.ndim == 0:
        return array.item(), non_finite
    if kind in _ORJSON_KINDS or kind == "b":
        return np.ascontiguousarray(array), non_finite
    return array.tolist(), non_finite


def _bytes_to_text(value: Any) -> Any:
    if isinstance(value, bytes):
        # Text models give UTF-8; anything else is shown escaped rather than failing.
        return value.decode("utf-8", errors="backslashreplace")
    return value


def flatten_nested(value: Any, where: str) -> tuple[tuple[int, ...], list[Any]]:
    """Checks that a nested list is rectangular and returns its shape and leaves.

    Works level by level with C-speed ``map``/``chain`` instead of recursing per element.

    Args:
        value: A scalar or a nested list.
        where: What the value is (``input "pixels"``), for error messages.

    Returns:
        The shape and the leaves in row-major order.

    Raises:
        InvalidInput: The lists are ragged, or lists and scalars are mixed at one depth.
    """
    shape: list[int] = []
    level: list[Any] = [value]
    while True:
        types = set(map(type, level))
        if list not in types:
            return tuple(shape), level
        if len(types) > 1:
            raise InvalidInput(
                f"{where} mixes lists and scalars at depth {len(shape)}: every element at one depth "
                "must be a list of the same length (wrong nesting?)"
            )
        lengths = set(map(len, level))
        if len(lengths) > 1:
            first = len(level[0])
            other = next(n for n in map(len, level) if n != first)
            raise InvalidInput(
                f"{where} is ragged: lists at depth {len(shape) + 1} have different lengths "
                f"({first} and {other}); every row must have the same shape"
            )
        shape.append(lengths.pop())
        level = list(chain.from_iterable(level))
        if not level:
            return tuple(shape), level


def describe_value(value: Any) -> str:
    """A short description of a JSON value for error messages (``a string ("abc")``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        shown = value if len(value) <= 32 else value[:29] + "..."
        return f"a string ({json.dumps(shown)})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} ({value!r})"


def is_b64(value: Any) -> bool:
    """Whether a JSON value is TF Serving's ``{"b64": "..."}`` bytes wrapper."""
    return type(value) is dict and len(value) == 1 and "b64" in value


def decode_b64(value: dict[str, Any], where: str) -> bytes:
    """Decodes a ``{"b64": "..."}`` wrapper.

    Raises:
        InvalidInput: The payload is not a base64 string.
    """
    payload = value["b64"]
    if not isinstance(payload, str):
        raise InvalidInput(f'{where}: "b64" must be a base64 string, got {describe_value(payload)}')
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"{where}: invalid base64 in {{'b64': ...}}: {error}") from None


# The largest integer each float type holds exactly, as TF Serving's IsLosslessDecimal has it
# ((1 << digits) - 1); float16, which TF Serving's JSON does not take, is left as NumPy rounds.
_EXACT_INTEGERS = {4: (1 << 24) - 1, 8: (1 << 53) - 1}


def _check_exact_integers(array: np.ndarray, leaves: list[Any], dtype: np.dtype, where: str) -> None:
    """Refuses JSON integers a float tensor would silently round, as TF Serving does.

    Decimals are never exact in binary and are taken as the nearest float; an integer such as
    16777217 looks exact to the client but becomes 16777216 in a float32. The scan of the
    leaves runs only when the converted array holds a value that large.
    """
    limit = _EXACT_INTEGERS[dtype.itemsize]
    if array.size == 0 or not np.nanmax(np.abs(array), initial=0) > limit:
        return
    bad = next((v for v in leaves if type(v) is int and abs(v) > limit), None)
    if bad is not None:
        raise InvalidInput(
            f"{where}: {bad} cannot be converted to {dtype.name} without loss of precision "
            f"(integers up to {limit} are exact; send a decimal such as {bad}.0 to accept rounding)"
        )


def has_no_booleans(text: bytes) -> bool:
    """Whether a JSON text surely holds no ``true`` or ``false`` (a string that spells one counts).

    :func:`exact_float_array` needs this: NumPy reads a JSON ``true`` among numbers as 1.
    """
    return b"true" not in text and b"false" not in text


def exact_float_array(value: Any, dtype: np.dtype) -> np.ndarray | None:
    """Nested lists of JSON numbers as a float array in one NumPy call, when that is exact.

    The usual request, rows of plain numbers for a float32 input, needs none of
    :func:`leaves_to_array`'s checks value by value: NumPy builds the array in C, and one
    range check stands for them. Anything that check cannot vouch for gives None, and the
    caller takes the checking path, which builds the same array or names what is wrong:
    a value that is not a number (NumPy makes text or objects of it), ragged lists (NumPy
    refuses them), an integer the float type would round or a value beyond its range
    (beyond ±2**24 for float32, ±2**53 for float64, where the checks start), NaN, an empty
    tensor, a dtype other than float32 or float64. The caller must know that the document
    holds no JSON booleans (:func:`has_no_booleans`): NumPy would read ``true`` as 1.

    Args:
        value: The tensor as parsed from JSON.
        dtype: The input's dtype.

    Returns:
        The array, or None to take :func:`flatten_nested` and :func:`leaves_to_array`.
    """
    limit = _EXACT_INTEGERS.get(dtype.itemsize) if dtype.kind == "f" else None
    if limit is None or type(value) is not list:
        return None
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.dtype.kind not in "fi" or not array.size:
        return None
    # NaN fails the comparison too, so it takes the checking path.
    if not np.abs(array).max() <= limit:
        return None
    return array.astype(dtype, copy=False)


def leaves_to_array(
    leaves: list[Any],
    shape: tuple[int, ...],
    dtype: np.dtype,
    where: str,
    *,
    allow_b64: bool = False,
) -> np.ndarray:
    """Builds an array of ``dtype`` from JSON leaves, refusing values of the wrong kind.

    NumPy alone would turn ``true`` into 1.0, ``"1.5"`` into 1.5 and ``null`` into NaN;
    here each is an error that names the value.

    Args:
        leaves: Row-major leaves from :func:`flatten_nested`.
        shape: Their shape.
        dtype: The tensor's dtype; ``object`` means bytes/strings.
        where: What the tensor is, for error messages.
        allow_b64: Whether ``{"b64": ...}`` leaves are decoded (TF Serving). Defaults to False.

    Returns:
        The array, shaped.

    Raises:
        InvalidInput: A leaf has the wrong type or is out of range for the dtype.
    """
    kinds = set(map(type, leaves))
    kind = dtype.kind
    if kind == "b":
        if kinds - {bool}:
            bad = next(v for v in leaves if type(v) is not bool)
            raise InvalidInput(f"{where} expects booleans (BOOL) but got {describe_value(bad)}")
        return np.array(leaves, dtype=dtype).reshape(shape)
    if kind in "iuf":
        if kinds - {int, float}:
            bad = next(v for v in leaves if type(v) is not int and type(v) is not float)
            raise InvalidInput(f"{where} expects numbers ({dtype.name}) but got {describe_value(bad)}")
        if kind in "iu" and float in kinds:
            bad = next((v for v in leaves if type(v) is float and not v.is_integer()), None)
            if bad is not None:
                raise InvalidInput(f"{where} expects integers ({dtype.name}) but got {bad!r}")
        try:
            with np.errstate(over="raise"):
                array = np.array(leaves, dtype=dtype).reshape(shape)
        except (OverflowError, FloatingPointError, ValueError) as error:
            raise InvalidInput(f"{where}: a value is out of range for {dtype.name} ({error})") from None
        if int in kinds and dtype.itemsize in _EXACT_INTEGERS and kind == "f":
            _check_exact_integers(array, leaves, dtype, where)
        return array
    if kind == "O":
        out = np.empty(len(leaves), dtype=object)
        for i, v in enumerate(leaves):
            if type(v) is str:
                out[i] = v.encode()
            elif allow_b64 and is_b64(v):
                out[i] = decode_b64(v, where)
            else:
                expected = 'strings or {"b64": ...}' if allow_b64 else "strings"
                raise InvalidInput(f"{where} expects {expected} (BYTES) but got {describe_value(v)}")
        return out.reshape(shape)
    raise InvalidInput(f"{where}: dtype {dtype.name} cannot be sent as JSON")


OFF_LOOP_DECODE_BYTES = 1024 * 1024
"""Bodies from this size up are decoded on a thread, not on the event loop."""
# Bodies below this size are decoded as they are; the value count is checked from here up.
COUNT_VALUES_FROM_BYTES = 64 * 1024
# Commas a valid body may hold beyond its values: keys, shapes, parameters, outputs.
_STRUCTURE_COMMAS = 256


def values_per_row(specs: Sequence[TensorSpec]) -> int | None:
    """How many JSON values one row of these inputs holds, or None when that is unbounded.

    Unbounded: an input with a free dimension past the batch one, or a BYTES input (its
    strings may hold commas, so commas do not count its values).
    """
    total = 0
    for spec in specs:
        if spec.dtype.kind in "OSU" or any(dim < 0 for dim in spec.shape[1:]):
            return None
        total += math.prod(spec.shape[1:])
    return total


def check_value_count(body: bytes, specs: Sequence[TensorSpec], max_rows: int, model: str) -> None:
    """Refuses a JSON body that holds more values than ``max_rows`` rows of the inputs can.

    Runs before the body is parsed: parsing builds a Python object per value, with the
    GIL held for the whole parse (seconds for a 64 MiB body, during which the event loop
    and every probe wait). Every value but the last of a JSON array is followed by a
    comma, and a JSON string of a numeric input is invalid anyway, so a body with more
    commas than ``max_rows`` rows of values (plus the structure's own) cannot be a valid
    request: too many rows, or rows of the wrong shape. One ``bytes.count`` decides.

    Args:
        body: The JSON text (for the binary extension, its JSON header only).
        specs: The version's inputs.
        max_rows: The most rows a request may have (``max_batch_size``).
        model: The model name, for the message.

    Raises:
        InvalidInput: The body holds more values than the limit allows.
    """
    if len(body) < COUNT_VALUES_FROM_BYTES:
        return
    per_row = values_per_row(specs)
    if per_row is None:
        return
    bound = max_rows * (per_row + len(specs)) + _STRUCTURE_COMMAS * max(1, len(specs))
    commas = body.count(b",")
    if commas > bound:
        raise InvalidInput(
            f"the request holds more than {bound} values (it has {commas:,} commas), more than "
            f"{max_rows} rows of model {model!r}'s inputs ({per_row} values a row) can: too many "
            f"rows (max_batch_size is {max_rows}) or rows of the wrong shape; refused before decoding"
        )
