"""The TF Serving gRPC codec: ``tensorflow.TensorProto`` and the PredictionService messages.

Pure functions between the protobuf messages of ``tensorflow-serving-api`` and the
transport-neutral types of :mod:`modelloop.serving.types`. Nothing here does I/O.

Decoding accepts every encoding TF Serving clients use:

* ``tensor_content``: raw little-endian bytes, row-major (what ``tf.make_tensor_proto``
  writes for NumPy arrays);
* the typed repeated fields, one per dtype (TensorFlow's ``tensor.proto``):
  ``float_val`` (DT_FLOAT), ``double_val`` (DT_DOUBLE), ``int_val`` (DT_INT32, DT_INT16,
  DT_INT8, DT_UINT8, DT_UINT16), ``int64_val``, ``bool_val``, ``string_val``,
  ``half_val`` (DT_HALF, as the 16-bit patterns), ``uint32_val`` and ``uint64_val``.

Broadcasting rule (decided here, documented for clients): a typed field must hold
exactly as many values as the shape has elements, or exactly one value, which then
fills the whole shape. One value is what ``tf.make_tensor_proto(v, shape=...)`` writes
for a constant, and TensorFlow's ``Tensor::FromProto`` fills a shape from it. TensorFlow
also pads any shorter list with its last value and reads an empty list as zeros; we
reject both, because for a prediction request they are almost always a truncated or
missing row, and a silent zero-filled prediction is worse than an error.

Encoding writes ``tensor_content`` for every numeric and bool dtype (one memcpy, no
per-element protobuf work) and ``string_val`` for strings.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from modelloop.serving.datatypes import TF_ENUM_NAME, from_tf_dtype, to_tf_dtype
from modelloop.serving.errors import InvalidInput
from modelloop.serving.protos.tfserving import tensorflow_core_framework_tensor_pb2 as tensor_pb2
from modelloop.serving.protos.tfserving import tensorflow_core_framework_tensor_shape_pb2 as tensor_shape_pb2
from modelloop.serving.protos.tfserving import tensorflow_core_framework_types_pb2 as types_pb2
from modelloop.serving.protos.tfserving import tensorflow_core_protobuf_meta_graph_pb2 as meta_graph_pb2
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_get_model_metadata_pb2 as get_model_metadata_pb2,
)
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_get_model_status_pb2 as get_model_status_pb2,
)
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_model_pb2 as model_pb2
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_predict_pb2 as predict_pb2
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    TensorSpec,
    VersionStatus,
    parse_version,
)

# Which typed field of TensorProto carries each NumPy dtype (tensorflow/core/framework/tensor.proto).
_VALUE_FIELD: dict[str, str] = {
    "float32": "float_val",
    "float64": "double_val",
    "int32": "int_val",
    "int16": "int_val",
    "int8": "int_val",
    "uint8": "int_val",
    "uint16": "int_val",
    "int64": "int64_val",
    "bool": "bool_val",
    "object": "string_val",
    "float16": "half_val",
    "uint32": "uint32_val",
    "uint64": "uint64_val",
}
_ALL_VALUE_FIELDS: tuple[str, ...] = (
    "float_val",
    "double_val",
    "int_val",
    "int64_val",
    "bool_val",
    "string_val",
    "half_val",
    "uint32_val",
    "uint64_val",
    "scomplex_val",
    "dcomplex_val",
    "resource_handle_val",
    "variant_val",
)
# int_val is an int32 field; these dtypes ride in it and must be range-checked.
_NARROW_INTS: frozenset[str] = frozenset({"int16", "int8", "uint8", "uint16"})

_STATE_TO_TF: dict[ModelState, int] = {
    ModelState.START: get_model_status_pb2.ModelVersionStatus.START,
    ModelState.LOADING: get_model_status_pb2.ModelVersionStatus.LOADING,
    ModelState.AVAILABLE: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
    ModelState.UNLOADING: get_model_status_pb2.ModelVersionStatus.UNLOADING,
    ModelState.END: get_model_status_pb2.ModelVersionStatus.END,
    # TF Serving has no FAILED state: a version that failed to load ends, with an error status.
    ModelState.FAILED: get_model_status_pb2.ModelVersionStatus.END,
    # Nor UNLOADED (loads on its first request): a version not loaded yet starts.
    ModelState.UNLOADED: get_model_status_pb2.ModelVersionStatus.START,
}
# tensorflow.error.Code: OK = 0, UNKNOWN = 2.
_TF_ERROR_OK = 0
_TF_ERROR_UNKNOWN = 2

_LITTLE = sys.byteorder == "little"
PREDICT_METHOD_NAME = "tensorflow/serving/predict"
SIGNATURE_DEF_FIELD = "signature_def"


def _shape_of(proto: tensor_pb2.TensorProto, name: str) -> tuple[int, ...]:
    if proto.tensor_shape.unknown_rank:
        raise InvalidInput(f"input {name!r}: tensor_shape has unknown_rank; a request needs a full shape")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: tensor_shape {list(shape)} has a negative dimension")
    return shape


def _dtype_of(proto: tensor_pb2.TensorProto, name: str) -> np.dtype:
    try:
        return from_tf_dtype(proto.dtype)
    except InvalidInput:
        label = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else "?"
        raise InvalidInput(
            f"input {name!r}: unsupported dtype {label} ({proto.dtype}); supported: "
            + ", ".join(TF_ENUM_NAME[v] for v in sorted(TF_ENUM_NAME))
        ) from None


def _check_int_range(values: np.ndarray, dtype: np.dtype, name: str) -> None:
    if values.size == 0:
        return
    info = np.iinfo(dtype)
    low, high = int(values.min()), int(values.max())
    if low < info.min or high > info.max:
        raise InvalidInput(
            f"input {name!r}: int_val holds {low if low < info.min else high}, "
            f"out of range for {dtype.name} [{info.min}, {info.max}]"
        )


def _from_tensor_content(
    proto: tensor_pb2.TensorProto, dtype: np.dtype, shape: tuple[int, ...], name: str
) -> np.ndarray:
    if dtype.kind == "O":
        # TF's string tensor_content is an internal varint layout no client sends; say so.
        raise InvalidInput(f"input {name!r}: DT_STRING tensors must use string_val, not tensor_content")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    got = len(proto.tensor_content)
    if got != expected:
        raise InvalidInput(
            f"input {name!r}: tensor_content has {got} bytes, but shape {list(shape)} of "
            f"{TF_ENUM_NAME[proto.dtype]} needs {expected} ({count} x {dtype.itemsize})"
        )
    # The wire is little-endian; .astype copies into a native, writable array.
    wire = (
        dtype if dtype.byteorder in "<|" or (dtype.byteorder == "=" and _LITTLE) else dtype.newbyteorder("<")
    )
    return np.frombuffer(proto.tensor_content, dtype=wire).astype(dtype).reshape(shape)


def _from_value_field(
    proto: tensor_pb2.TensorProto, dtype: np.dtype, shape: tuple[int, ...], name: str
) -> np.ndarray:
    field = _VALUE_FIELD[dtype.name]
    values = getattr(proto, field)
    count = math.prod(shape)
    n = len(values)
    if n == 0:
        others = [f for f in _ALL_VALUE_FIELDS if f != field and len(getattr(proto, f))]
        hint = f"; found values in {', '.join(others)} instead" if others else ""
        if count == 0 and not others:
            return np.empty(shape, dtype=dtype)
        raise InvalidInput(
            f"input {name!r}: {TF_ENUM_NAME[proto.dtype]} with shape {list(shape)} needs {count} "
            f"value(s) in tensor_content or {field}{hint}"
        )
    if n not in (count, 1):
        raise InvalidInput(
            f"input {name!r}: {field} has {n} values, but shape {list(shape)} has {count} elements "
            "(send exactly that many, or one value to fill the shape)"
        )
    if dtype.kind == "O":
        flat = np.empty(n, dtype=object)
        flat[:] = list(values)
    elif dtype.name == "float16":
        # half_val carries the IEEE-754 binary16 bit patterns in int32 slots.
        bits = np.asarray(values, dtype=np.int64)
        _check_int_range(bits, np.dtype(np.uint16), name)
        flat = bits.astype(np.uint16).view(np.float16)
    elif dtype.name in _NARROW_INTS:
        wide = np.asarray(values, dtype=np.int64)
        _check_int_range(wide, dtype, name)
        flat = wide.astype(dtype)
    else:
        flat = np.asarray(values, dtype=dtype)
    if n == 1 and count != 1:
        return np.full(shape, flat[0], dtype=dtype)
    return flat.reshape(shape)


def to_numpy(proto: tensor_pb2.TensorProto, name: str = "tensor") -> np.ndarray:
    """Decodes a ``TensorProto`` into a NumPy array.

    Args:
        proto: The tensor, with ``tensor_content`` or the typed field of its dtype.
        name: The input's name, used in error messages. Defaults to ``"tensor"``.

    Returns:
        A writable array of the proto's dtype and shape; strings come back as an
        ``object`` array of ``bytes``.

    Raises:
        InvalidInput: Unknown dtype, unknown rank, a negative dimension, or a
            ``tensor_content`` length or value count that disagrees with the shape.

    Example:

    >>> proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0])
    >>> proto.tensor_shape.dim.add(size=2)
    size: 2
    <BLANKLINE>
    >>> to_numpy(proto, "x").tolist()
    [1.0, 2.0]
    """
    dtype = _dtype_of(proto, name)
    shape = _shape_of(proto, name)
    if proto.tensor_content:
        return _from_tensor_content(proto, dtype, shape, name)
    return _from_value_field(proto, dtype, shape, name)


def _shape_proto(shape: Iterable[int]) -> tensor_shape_pb2.TensorShapeProto:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    return tensor_shape_pb2.TensorShapeProto(dim=dims)


def fill_tensor(proto: tensor_pb2.TensorProto, array: np.ndarray) -> None:
    """Writes a NumPy array into an (empty) ``TensorProto`` in place; see :func:`from_numpy`.

    Filling the message a response already holds skips building a tensor and copying it in.

    Raises:
        InvalidInput: The dtype has no TensorFlow ``DataType``.
    """
    array = np.asarray(array)
    proto.dtype = to_tf_dtype(array.dtype)
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    if array.dtype.kind in "OSU":
        proto.string_val.extend(
            v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.reshape(-1).tolist()
        )
    elif array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        proto.tensor_content = array.astype(array.dtype.newbyteorder("<")).tobytes()
    else:
        proto.tensor_content = array.tobytes()  # C order, whatever the array's strides


def from_numpy(array: np.ndarray) -> tensor_pb2.TensorProto:
    """Encodes a NumPy array as a ``TensorProto``.

    Numeric and bool arrays go into ``tensor_content`` (little-endian, row-major), which
    ``tf.make_ndarray`` and every TF Serving client read. String, bytes and object
    arrays go into ``string_val`` (``str`` is encoded as UTF-8).

    Args:
        array: The tensor.

    Returns:
        The encoded tensor.

    Raises:
        InvalidInput: The dtype has no TensorFlow ``DataType``.

    Example:

    >>> proto = from_numpy(np.array([[1, 2]], dtype=np.int32))
    >>> to_numpy(proto).tolist()
    [[1, 2]]
    """
    proto = tensor_pb2.TensorProto()
    fill_tensor(proto, array)
    return proto


def model_spec_target(spec: model_pb2.ModelSpec) -> tuple[str, str | None, str | None]:
    """The model name, the version as text and the label a ``ModelSpec`` names.

    The version stays text so that the data plane's one parser judges it (a negative
    ``Int64Value`` is no version), after the model name is known for the metrics.

    Raises:
        InvalidInput: The name is empty.
    """
    if not spec.name:
        raise InvalidInput("model_spec.name is required")
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.name, str(spec.version.value), None
    if choice == "version_label":
        return spec.name, None, spec.version_label or None
    return spec.name, None, None


def decode_model_spec(spec: model_pb2.ModelSpec) -> tuple[str, int | None, str | None, str | None]:
    """Splits a ``ModelSpec`` into name, version, label and signature name.

    Args:
        spec: The request's model spec.

    Returns:
        ``(name, version, label, signature_name)``; unset parts are None.

    Raises:
        InvalidInput: The name is empty, or the version is negative.
    """
    name, version, label = model_spec_target(spec)
    return name, parse_version(version), label, spec.signature_name or None


def decode_predict_request(request: predict_pb2.PredictRequest, request_id: str = "") -> InferRequest:
    """Decodes a ``PredictRequest`` into an :class:`InferRequest`.

    Args:
        request: The gRPC request.
        request_id: The request id from the call's ``x-request-id`` metadata, or ``""``
            to let the data plane make one. Defaults to ``""``.

    Returns:
        The transport-neutral request; ``output_filter`` becomes ``outputs``.

    Raises:
        InvalidInput: No model name, no inputs, or a tensor that does not decode.
    """
    name, version, label, signature = decode_model_spec(request.model_spec)
    if not request.inputs:
        raise InvalidInput("PredictRequest has no inputs")
    inputs = {key: to_numpy(tensor, key) for key, tensor in request.inputs.items()}
    return InferRequest(
        model=name,
        inputs=inputs,
        protocol=Protocol.TFSERVING_GRPC,
        version=version,
        label=label,
        outputs=list(request.output_filter) or None,
        id=request_id,
        signature_name=signature,
    )


def encode_model_spec(name: str, version: int, signature_name: str | None = None) -> model_pb2.ModelSpec:
    """Builds the effective ``ModelSpec`` a response reports.

    Args:
        name: Model name.
        version: The version that answered.
        signature_name: The signature served; omitted when None. Defaults to None.

    Returns:
        The model spec.
    """
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name or "")
    spec.version.value = version
    return spec


def encode_predict_response(
    response: InferResponse, signature_name: str = "serving_default"
) -> predict_pb2.PredictResponse:
    """Encodes an :class:`InferResponse` as a ``PredictResponse``.

    Args:
        response: The data plane's result.
        signature_name: The signature that answered. Defaults to ``"serving_default"``.

    Returns:
        The gRPC response, every output in ``tensor_content``.
    """
    out = predict_pb2.PredictResponse()
    spec = out.model_spec
    spec.name = response.model
    spec.signature_name = signature_name or ""
    spec.version.value = response.version
    for key, array in response.outputs.items():
        fill_tensor(out.outputs[key], array)
    return out


def _tensor_info(spec: TensorSpec, tensor_name: str) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(
        name=tensor_name, dtype=to_tf_dtype(spec.dtype), tensor_shape=_shape_proto(spec.shape)
    )


def encode_signature_def_map(metadata: ModelMetadata) -> get_model_metadata_pb2.SignatureDefMap:
    """Describes a model's one signature as TF Serving's ``SignatureDefMap``.

    Args:
        metadata: The model version's metadata.

    Returns:
        A map with one ``SignatureDef`` under ``metadata.signature_name``; -1 marks a
        free dimension, as in a SavedModel.
    """
    signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD_NAME)
    for spec in metadata.inputs:
        signature.inputs[spec.name].CopyFrom(_tensor_info(spec, f"{metadata.signature_name}_{spec.name}:0"))
    for index, spec in enumerate(metadata.outputs):
        signature.outputs[spec.name].CopyFrom(_tensor_info(spec, f"StatefulPartitionedCall:{index}"))
    result = get_model_metadata_pb2.SignatureDefMap()
    result.signature_def[metadata.signature_name].CopyFrom(signature)
    return result


def check_metadata_fields(fields: Sequence[str]) -> None:
    """Checks ``GetModelMetadataRequest.metadata_field``.

    TF Serving only knows ``signature_def``. An empty list is read as ``signature_def``
    too, so a bare request gets the one thing there is.

    Raises:
        InvalidInput: A field other than ``signature_def`` was asked for.
    """
    unknown = [f for f in fields if f != SIGNATURE_DEF_FIELD]
    if unknown:
        raise InvalidInput(
            f"metadata_field {', '.join(repr(f) for f in unknown)} is not supported; "
            f"the only field is {SIGNATURE_DEF_FIELD!r}"
        )


def encode_model_metadata_response(
    metadata: ModelMetadata,
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """Encodes model metadata as a ``GetModelMetadataResponse``.

    Args:
        metadata: The resolved version's metadata.

    Returns:
        The response, with the ``SignatureDefMap`` packed into ``metadata["signature_def"]``
        (a ``google.protobuf.Any``), as TF Serving does.
    """
    response = get_model_metadata_pb2.GetModelMetadataResponse(
        model_spec=encode_model_spec(metadata.name, metadata.version)
    )
    response.metadata[SIGNATURE_DEF_FIELD].Pack(encode_signature_def_map(metadata))
    return response


def encode_model_status_response(
    statuses: Iterable[VersionStatus],
) -> get_model_status_pb2.GetModelStatusResponse:
    """Encodes version states as a ``GetModelStatusResponse``.

    Args:
        statuses: One entry per version. FAILED becomes TF Serving's END with an error
            status carrying the reason.

    Returns:
        The response.
    """
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in statuses:
        entry = response.model_version_status.add(version=status.version, state=_STATE_TO_TF[status.state])
        failed = status.state is ModelState.FAILED
        entry.status.error_code = _TF_ERROR_UNKNOWN if failed else _TF_ERROR_OK
        entry.status.error_message = status.error_message if failed else ""
    return response
