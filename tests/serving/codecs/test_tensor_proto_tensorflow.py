"""The TensorProto codec against TensorFlow's own ``make_tensor_proto`` and ``make_ndarray``, for
every ``DataType`` TensorFlow defines.

For each dtype the codec serves, every way TensorFlow itself writes a proto (a NumPy array,
a Python list, a scalar broadcast over a shape, an empty tensor) must decode to exactly what
``tf.make_ndarray`` reads from it, and what the codec writes must be the proto
``tf.make_tensor_proto`` writes, so a TensorFlow client reads it back unchanged. Every other
dtype (complex, bfloat16, the quantized and 8/4/2-bit types, resources and variants) is
refused with INVALID_ARGUMENT naming the type, where TensorFlow would accept some of them:
ONNX Runtime and the SavedModel signatures we export take none of them as inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from modelloop.errors import ErrorCode
from modelloop.serving.codecs import tensor_proto
from modelloop.serving.datatypes import TF_TO_NUMPY
from modelloop.serving.errors import InvalidInput

SERVED = sorted(TF_TO_NUMPY)
REFUSED = sorted(
    value
    for name, value in types_pb2.DataType.items()
    if not name.endswith("_REF") and value not in TF_TO_NUMPY
)


def _name(value: int) -> str:
    return types_pb2.DataType.Name(value)


def _wire(proto: tensor_pb2.TensorProto) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto.FromString(proto.SerializeToString())


def _values(dtype: tf.DType, shape: tuple[int, ...]) -> np.ndarray:
    """Values that cover each type's range: extremes, zero, and for floats NaN, infinity and a fraction."""
    count = int(np.prod(shape))
    if dtype == tf.string:
        pool = [b"", b"a", "é".encode(), b"\x00\xff", b"longer string"]
        return np.array([pool[i % len(pool)] for i in range(count)], dtype=object).reshape(shape)
    if dtype == tf.bool:
        return (np.arange(count) % 2 == 0).reshape(shape)
    np_dtype = dtype.as_numpy_dtype
    if dtype.is_floating:
        info = np.finfo(np_dtype)
        pool = [
            0.0,
            -0.0,
            1.5,
            -2.25,
            float(info.max),
            float(info.min),
            float(info.tiny),
            np.inf,
            -np.inf,
            np.nan,
        ]
    else:
        info = np.iinfo(np_dtype)
        pool = [0, 1, int(info.max), int(info.min), 7]
    return np.array([pool[i % len(pool)] for i in range(count)], dtype=np_dtype).reshape(shape)


def _same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    assert ours.shape == theirs.shape
    if ours.dtype.kind == "f":
        np.testing.assert_array_equal(ours, theirs)  # NaN equals NaN here
        assert (np.signbit(ours) == np.signbit(theirs)).all()  # -0.0 stays -0.0
    else:
        assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("enum", SERVED, ids=_name)
@pytest.mark.parametrize("shape", [(2, 5), (1,), (), (0, 3)], ids=["matrix", "vector", "scalar", "empty"])
def test_decodes_what_make_tensor_proto_writes_as_make_ndarray_reads_it(
    enum: int, shape: tuple[int, ...]
) -> None:
    dtype = tf.dtypes.as_dtype(enum)
    array = _values(dtype, shape)
    # TensorFlow converts a Python list through int64 and warns on larger uint64 values.
    listed = np.minimum(array, np.iinfo(np.int64).max) if dtype == tf.uint64 else array
    for proto in (
        tf.make_tensor_proto(array),  # a NumPy array: tensor_content, or string_val
        tf.make_tensor_proto(listed.tolist(), dtype=dtype, shape=shape),  # a Python list
    ):
        wire = _wire(proto)
        _same(tensor_proto.to_numpy(wire, "x"), tf.make_ndarray(wire))


@pytest.mark.parametrize("enum", SERVED, ids=_name)
def test_a_broadcast_scalar_fills_the_shape_as_make_ndarray_does(enum: int) -> None:
    dtype = tf.dtypes.as_dtype(enum)
    value = _values(dtype, (3,))[2]
    proto = _wire(tf.make_tensor_proto(value, dtype=dtype, shape=[2, 3]))
    # TensorFlow writes one value into the typed field (half_val, int_val, ...) for a constant.
    assert not proto.tensor_content
    _same(tensor_proto.to_numpy(proto, "x"), tf.make_ndarray(proto))


@pytest.mark.parametrize("enum", SERVED, ids=_name)
@pytest.mark.parametrize("shape", [(2, 5), (), (0, 3)], ids=["matrix", "scalar", "empty"])
def test_make_ndarray_reads_what_we_encode_as_it_reads_make_tensor_proto(
    enum: int, shape: tuple[int, ...]
) -> None:
    dtype = tf.dtypes.as_dtype(enum)
    array = _values(dtype, shape)
    ours, theirs = _wire(tensor_proto.from_numpy(array)), _wire(tf.make_tensor_proto(array))
    assert (ours.dtype, ours.tensor_shape) == (theirs.dtype, theirs.tensor_shape)
    # The wire form may differ: we write tensor_content for every numeric and bool tensor (one
    # copy), where TensorFlow writes typed fields for scalars, bool and uint16. Both read alike.
    if dtype != tf.string:
        assert ours.tensor_content == array.astype(array.dtype.newbyteorder("<")).tobytes()
    _same(tf.make_ndarray(ours), tf.make_ndarray(theirs))
    _same(tf.make_ndarray(ours), array)


@pytest.mark.parametrize("enum", REFUSED, ids=_name)
def test_other_dtypes_are_refused_by_name(enum: int) -> None:
    proto = tensor_pb2.TensorProto(dtype=enum)
    proto.tensor_shape.dim.add(size=1)
    proto.tensor_content = b"\x00" * 16
    with pytest.raises(InvalidInput, match=rf"input 'x': unsupported dtype {_name(enum)} \({enum}\)") as info:
        tensor_proto.to_numpy(_wire(proto), "x")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_every_datatype_is_covered() -> None:
    defined = {value for name, value in types_pb2.DataType.items() if not name.endswith("_REF")}
    assert set(SERVED) | set(REFUSED) == defined
    # TensorFlow reads some of the refused types; the codec says so rather than guessing.
    complex_proto = _wire(tf.make_tensor_proto(np.array([1 + 2j], dtype=np.complex64)))
    assert tf.make_ndarray(complex_proto).tolist() == [1 + 2j]
    with pytest.raises(InvalidInput, match="DT_COMPLEX64"):
        tensor_proto.to_numpy(complex_proto, "x")
