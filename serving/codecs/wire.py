"""Inference responses written straight to protobuf wire bytes, without building messages.

A ``PredictResponse`` or ``ModelInferResponse`` of numeric outputs is a few length-
delimited fields around each output's raw bytes. Building the message object (a map
entry, a shape message per output, each dim an object) and serializing it costs more
than the rest of the encoding; here the fixed parts (the model spec, each output's name
and dtype) are written once per model, version and output and kept, and a response is
those fragments, the shape and the array's bytes joined. The bytes parse to the very
message :func:`~.tensor_proto.encode_predict_response` and
:func:`~.v2_grpc.encode_infer_response` build (``tests/serving/codecs/test_wire.py``);
what they do not cover (string outputs, response parameters, outputs to shared memory)
answers None here and takes the message path.

Example:

```python
data = encode_predict_bytes(response, "serving_default")
if data is None:
    data = tensor_proto.encode_predict_response(response, "serving_default").SerializeToString()
```
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import numpy as np

from modelloop.serving.datatypes import to_oip_datatype, to_tf_dtype
from modelloop.serving.types import InferResponse

_LITTLE = sys.byteorder == "little"
_CACHE_LIMIT = 4096
"""The most fragments kept (model, version and output names chosen by the repository, not clients)."""
_fragments: dict[tuple[object, ...], bytes] = {}


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _fragment(key: tuple[object, ...], build: Callable[[], bytes]) -> bytes:
    """The fixed bytes under ``key``, built once."""
    found = _fragments.get(key)
    if found is None:
        if len(_fragments) >= _CACHE_LIMIT:
            _fragments.clear()
        found = _fragments[key] = build()
    return found


def _raw(array: np.ndarray) -> bytes | None:
    """The array's elements, C order, little-endian; None for strings and objects."""
    kind = array.dtype.kind
    if kind not in "biuf":
        return None
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        return array.astype(array.dtype.newbyteorder("<")).tobytes()
    return array.tobytes()


# -- tensorflow.serving.PredictResponse ------------------------------------------------------


def _model_spec(model: str, version: int, signature: str) -> bytes:
    # ModelSpec: name = 1, version = 2 (google.protobuf.Int64Value: value = 1), signature_name = 3.
    spec = _field(1, model.encode()) + _field(2, b"\x08" + varint(version))
    if signature:
        spec += _field(3, signature.encode())
    return _field(2, spec)


def encode_predict_bytes(response: InferResponse, signature_name: str = "serving_default") -> bytes | None:
    """A ``PredictResponse`` as wire bytes, or None when an output is not numeric.

    Args:
        response: The data plane's result.
        signature_name: The signature that answered. Defaults to ``"serving_default"``.

    Returns:
        The serialized message: the same message as
        :func:`~.tensor_proto.encode_predict_response`, every output in ``tensor_content``.
    """
    version = response.version
    if not isinstance(version, int) or version < 0:
        return None
    parts: list[bytes] = []
    for name, value in response.outputs.items():
        array = np.asarray(value)
        content = _raw(array)
        if content is None:
            return None
        dtype = to_tf_dtype(array.dtype)
        # TensorShapeProto: dim = 2 (Dim: size = 1).
        shape = b"".join(_field(2, b"\x08" + varint(size)) for size in array.shape)
        # TensorProto: dtype = 1, tensor_shape = 2, tensor_content = 4.
        tensor = b"\x08" + varint(dtype) + (_field(2, shape) if shape else b"") + _field(4, content)
        # The outputs map (field 1): entries of key = 1, value = 2.
        key = _fragment(("tf-key", name), partial(_field, 1, name.encode()))
        parts.append(_field(1, key + _field(2, tensor)))
    model, signature = response.model, signature_name or ""
    parts.append(
        _fragment(
            ("tf-spec", model, version, signature),
            partial(_model_spec, model, version, signature),
        )
    )
    return b"".join(parts)


# -- inference.ModelInferResponse ------------------------------------------------------------


def _infer_head(model: str, version: str) -> bytes:
    # ModelInferResponse: model_name = 1, model_version = 2.
    return (_field(1, model.encode()) if model else b"") + (_field(2, version.encode()) if version else b"")


def _output_head(name: str, datatype: str) -> bytes:
    # InferOutputTensor: name = 1, datatype = 2.
    return _field(1, name.encode()) + _field(2, datatype.encode())


def encode_infer_bytes(response: InferResponse, request_id: str | None = None) -> bytes | None:
    """A ``ModelInferResponse`` as wire bytes, or None off the fast path.

    Off the fast path: response parameters, or an output that is not numeric (BYTES).

    Args:
        response: The data plane's result.
        request_id: The ``id`` to echo; None uses ``response.id``. Defaults to None.

    Returns:
        The serialized message: the same message as :func:`~.v2_grpc.encode_infer_response`
        without shared memory outputs, every output's data in ``raw_output_contents``.
    """
    if response.parameters:
        return None
    model, version = response.model, str(response.version)
    head = _fragment(("oip-head", model, version), partial(_infer_head, model, version))
    request_id = response.id if request_id is None else request_id
    parts = [head, _field(3, request_id.encode()) if request_id else b""]
    contents: list[bytes] = []
    for name, value in response.outputs.items():
        array = np.asarray(value)
        content = _raw(array)
        if content is None:
            return None
        datatype = to_oip_datatype(array.dtype)
        # InferOutputTensor: name = 1, datatype = 2, shape = 3 (packed int64).
        fixed = _fragment(
            ("oip-out", name, datatype),
            partial(_output_head, name, datatype),
        )
        shape = b"".join(varint(size) for size in array.shape)
        parts.append(_field(5, fixed + (_field(3, shape) if shape else b"")))
        contents.append(_field(6, content))
    return b"".join(parts + contents)
