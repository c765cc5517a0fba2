"""The one place that maps dtypes between NumPy, the OIP and TensorFlow.

OIP datatypes are strings (``FP32``); TensorFlow's are ``DataType`` enum values
(``DT_FLOAT`` = 1) from ``tensorflow/core/framework/types.proto``.
"""

from __future__ import annotations

import numpy as np

from modelloop.serving.errors import InvalidInput

# (numpy dtype, OIP datatype, TF enum name, TF enum value)
_TABLE: tuple[tuple[str, str, str, int], ...] = (
    ("bool", "BOOL", "DT_BOOL", 10),
    ("uint8", "UINT8", "DT_UINT8", 4),
    ("uint16", "UINT16", "DT_UINT16", 17),
    ("uint32", "UINT32", "DT_UINT32", 22),
    ("uint64", "UINT64", "DT_UINT64", 23),
    ("int8", "INT8", "DT_INT8", 6),
    ("int16", "INT16", "DT_INT16", 5),
    ("int32", "INT32", "DT_INT32", 3),
    ("int64", "INT64", "DT_INT64", 9),
    ("float16", "FP16", "DT_HALF", 19),
    ("float32", "FP32", "DT_FLOAT", 1),
    ("float64", "FP64", "DT_DOUBLE", 2),
    ("object", "BYTES", "DT_STRING", 7),
)

NUMPY_TO_OIP: dict[str, str] = {n: o for n, o, _, _ in _TABLE}
OIP_TO_NUMPY: dict[str, str] = {o: n for n, o, _, _ in _TABLE}
NUMPY_TO_TF: dict[str, int] = {n: v for n, _, _, v in _TABLE}
TF_TO_NUMPY: dict[int, str] = {v: n for n, _, _, v in _TABLE}
TF_ENUM_NAME: dict[int, str] = {v: t for _, _, t, v in _TABLE}
OIP_ITEM_SIZE: dict[str, int] = {o: np.dtype(n).itemsize for n, o, _, _ in _TABLE if o != "BYTES"}
# The same maps keyed by dtype object: a dict hit per tensor instead of building a dtype
# and reading its name (both show in the profile of a request at thousands a second).
_DTYPE_TO_OIP: dict[np.dtype, str] = {np.dtype(n): o for n, o, _, _ in _TABLE}
_DTYPE_TO_TF: dict[np.dtype, int] = {np.dtype(n): v for n, _, _, v in _TABLE}
_TF_TO_DTYPE: dict[int, np.dtype] = {v: np.dtype(n) for n, _, _, v in _TABLE}
_OIP_TO_DTYPE: dict[str, np.dtype] = {o: np.dtype(n) for n, o, _, _ in _TABLE}


def to_numpy_dtype(oip_datatype: str) -> np.dtype:
    """The NumPy dtype of an OIP datatype; BYTES becomes ``object``.

    Raises:
        InvalidInput: The datatype is unknown or unsupported.
    """
    try:
        return _OIP_TO_DTYPE[oip_datatype]
    except KeyError:
        raise InvalidInput(
            f"unsupported datatype {oip_datatype!r}; expected one of {', '.join(OIP_TO_NUMPY)}"
        ) from None


def to_oip_datatype(dtype: np.dtype | str) -> str:
    """The OIP datatype of a NumPy dtype (``float32`` -> ``FP32``)."""
    known = _DTYPE_TO_OIP.get(dtype) if isinstance(dtype, np.dtype) else None
    if known is not None:
        return known
    d = np.dtype(dtype)
    name = "object" if d.kind in "OSU" else d.name
    try:
        return NUMPY_TO_OIP[name]
    except KeyError:
        raise InvalidInput(f"dtype {d.name} has no Open Inference Protocol datatype") from None


def to_tf_dtype(dtype: np.dtype | str) -> int:
    """The TensorFlow ``DataType`` value of a NumPy dtype (``float32`` -> 1)."""
    known = _DTYPE_TO_TF.get(dtype) if isinstance(dtype, np.dtype) else None
    if known is not None:
        return known
    d = np.dtype(dtype)
    name = "object" if d.kind in "OSU" else d.name
    try:
        return NUMPY_TO_TF[name]
    except KeyError:
        raise InvalidInput(f"dtype {d.name} has no TensorFlow DataType") from None


def from_tf_dtype(value: int) -> np.dtype:
    """The NumPy dtype of a TensorFlow ``DataType`` value.

    Raises:
        InvalidInput: The value is unknown or unsupported.
    """
    try:
        return _TF_TO_DTYPE[value]
    except KeyError:
        raise InvalidInput(f"unsupported TensorProto dtype {value}") from None
