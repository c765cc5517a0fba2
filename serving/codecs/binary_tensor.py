"""Triton's binary tensor format, shared by the OIP REST and gRPC codecs.

One tensor is its elements in row-major (C) order, little-endian, with no stride or
padding, each in the native size of its datatype; a BOOL element is one byte, 1 for true
and 0 for false. A BYTES element is a 4-byte little-endian unsigned length followed by
that many bytes. REST carries these bytes after the JSON header (Triton's
``extension_binary_data.md``, ``binary_data_size``), gRPC in ``raw_input_contents`` and
``raw_output_contents``; both transports decode and encode through this module, so the
same tensor gives the same bytes and the same array whichever way it travels.

Decoding returns read-only arrays on both transports: numeric tensors are zero-copy
views of the request's buffer, and a BYTES tensor is made read-only too so that no
caller comes to depend on writing into one kind of input but not another. Whoever needs
a writable or differently typed array (the data plane's cast, a runtime) copies it.

Example:

>>> raw = encode_binary_tensor(np.array([[1.5, -2.0]], dtype=np.float32))
>>> decode_binary_tensor(raw, "FP32", [1, 2], "x")
array([[ 1.5, -2. ]], dtype=float32)
>>> encode_binary_tensor(np.array(["é", b"\\x00"], dtype=object))
b'\\x02\\x00\\x00\\x00\\xc3\\xa9\\x01\\x00\\x00\\x00\\x00'
"""

from __future__ import annotations

import math
import operator
import struct
import sys
from collections.abc import Sequence

import numpy as np

from modelloop.serving.datatypes import to_numpy_dtype, to_oip_datatype
from modelloop.serving.errors import InvalidInput

# The length before every BYTES element: 4 bytes, unsigned, little-endian.
_LENGTH_PREFIX = struct.Struct("<I")
# On a little-endian host the wire layout is the native layout, so decoding is a view.
_NATIVE_IS_WIRE = sys.byteorder == "little"


def decode_binary_tensor(
    raw: bytes | memoryview, datatype: str, shape: Sequence[int], name: str
) -> np.ndarray:
    """Decodes one tensor in Triton's binary format.

    Args:
        raw: The tensor's bytes: a ``raw_input_contents`` entry, or the slice of a REST
            body that ``binary_data_size`` gives. A memoryview is not copied.
        datatype: The OIP datatype (``FP32``, ``BYTES``, ...).
        shape: The tensor's shape; every dimension non-negative.
        name: The input's name, for error messages.

    Returns:
        A read-only array of ``shape`` with the native dtype that
        :func:`~modelloop.serving.datatypes.to_numpy_dtype` gives ``datatype``. Numeric
        and BOOL tensors are zero-copy views of ``raw`` on a little-endian host (a
        converted copy elsewhere); BYTES gives an ``object`` array of ``bytes``.

    Raises:
        InvalidInput: An unknown datatype, a negative or non-integer dimension, a byte
            count that does not match shape x element size, a BOOL byte other than 0 or
            1, or BYTES data whose elements do not fill it exactly as the shape needs.

    Example:

    >>> decode_binary_tensor(b"\\x01\\x00\\x00\\x00a", "BYTES", [1], "text")
    array([b'a'], dtype=object)
    """
    dtype = _numpy_dtype(datatype, name)
    dims = _dims(shape, name)
    count = math.prod(dims)
    if datatype == "BYTES":
        # BYTES elements are copied out one by one anyway, so slicing ``bytes`` directly
        # saves the per-element memoryview that slicing a view would create.
        data = raw if isinstance(raw, bytes) else _byte_view(raw).tobytes()
        array = _split_bytes(data, count, dims, name)
    else:
        array = _numeric(_byte_view(raw), dtype, datatype, dims, count, name)
    # A view of a writable buffer (a bytearray body) would be writable; one behaviour
    # whatever the caller passed in.
    array.flags.writeable = False
    return array


def encode_binary_tensor(array: np.ndarray, datatype: str | None = None) -> bytes:
    """Encodes one tensor in Triton's binary format.

    Args:
        array: The tensor, any byte order or memory layout. ``object``, bytes (``S``)
            and str (``U``) arrays are BYTES.
        datatype: The OIP datatype the caller announces for these bytes (in a REST
            header or a gRPC ``InferOutputTensor``); checked against ``array``'s dtype so
            that the bytes can never disagree with it. None takes it from ``array``.
            Defaults to None.

    Returns:
        The elements in C order, little-endian. A BYTES element gets its 4-byte length
        prefix: ``bytes`` (and other bytes-like values) as they are, ``str`` as UTF-8,
        anything else as the UTF-8 of its ``str()``, as ``tritonclient`` does.

    Raises:
        InvalidInput: ``array``'s dtype has no OIP datatype (``complex64``, say).
        ValueError: ``datatype`` is not ``array``'s OIP datatype.

    Example:

    >>> encode_binary_tensor(np.array([1, 2], dtype=">i2"))
    b'\\x01\\x00\\x02\\x00'
    """
    array = np.asarray(array)
    actual = to_oip_datatype(array.dtype)
    if datatype is not None and datatype != actual:
        raise ValueError(f"array of dtype {array.dtype} is {actual}, not {datatype}")
    if actual == "BYTES":
        return _pack_bytes(array)
    # astype is a no-op for a native array on a little-endian host; tobytes writes C
    # order whatever the layout, so a transposed or sliced array needs no extra copy.
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")


def _numpy_dtype(datatype: str, name: str) -> np.dtype:
    try:
        return to_numpy_dtype(datatype)
    except InvalidInput as error:
        raise InvalidInput(f"input {name!r}: {error.message}") from None


def _dims(shape: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        # operator.index refuses floats, which int() would silently truncate.
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise InvalidInput(f"input {name!r}: shape {list(shape)!r} must hold integers") from None
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return dims


def _byte_view(raw: bytes | memoryview) -> memoryview:
    view = memoryview(raw)
    if not view.c_contiguous:
        # np.frombuffer needs one contiguous run of bytes; a strided view is rare enough
        # that copying it is the simple answer.
        view = memoryview(view.tobytes())
    # len() of a view is in its own items; as unsigned bytes it counts bytes.
    return view.cast("B")


def _numeric(
    view: memoryview, dtype: np.dtype, datatype: str, dims: tuple[int, ...], count: int, name: str
) -> np.ndarray:
    expected = count * dtype.itemsize
    if len(view) != expected:
        raise InvalidInput(
            f"input {name!r}: raw content has {_plural(len(view), 'byte')}, but shape {list(dims)} of "
            f"{datatype} needs {expected} bytes ({count} x {dtype.itemsize})"
        )
    if datatype == "BOOL" and count:
        # Triton's spec defines only 0 and 1. The view hands any other byte to the
        # runtime unchanged, and C++ runtimes take a bool byte to be 0 or 1 (anything
        # else is undefined behaviour there), so such a byte is refused here, by name.
        octets = np.frombuffer(view, dtype=np.uint8)
        bad = np.flatnonzero(octets > 1)
        if bad.size:
            raise InvalidInput(
                f"input {name!r}: BOOL element {int(bad[0])} is the byte {int(octets[bad[0]])}; "
                "each BOOL element must be 0 (false) or 1 (true)"
            )
    if _NATIVE_IS_WIRE:
        return np.frombuffer(view, dtype=dtype).reshape(dims)
    return np.frombuffer(view, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(dims)


def _split_bytes(data: bytes, count: int, dims: tuple[int, ...], name: str) -> np.ndarray:
    # Elements are collected in a list, not a preallocated array of ``count``: the data
    # bounds the list (every element costs at least 4 bytes), whereas a hostile shape
    # such as [2**40] would otherwise allocate before anything was checked.
    elements: list[bytes] = []
    offset, end = 0, len(data)
    while len(elements) < count:
        left = end - offset
        if left == 0:
            raise InvalidInput(
                f"input {name!r}: shape {list(dims)} needs {_plural(count, 'BYTES element')}, "
                f"but the raw content ({_plural(end, 'byte')}) ends after {len(elements)}"
            )
        if left < _LENGTH_PREFIX.size:
            raise InvalidInput(
                f"input {name!r}: raw content ends inside the 4-byte length prefix of BYTES element "
                f"{len(elements)} of {count} ({_plural(left, 'byte')} left)"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(data, offset)
        offset += _LENGTH_PREFIX.size
        if length > end - offset:
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(elements)} of {count} claims "
                f"{_plural(length, 'byte')}, but only {end - offset} remain"
            )
        elements.append(data[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidInput(
            f"input {name!r}: raw content has {_plural(end - offset, 'byte')} left over after the "
            f"{_plural(count, 'BYTES element')} of shape {list(dims)}"
        )
    array = np.empty(count, dtype=object)
    # Slice assignment stores each bytes object; np.array(elements) would make an
    # ``S`` array, padding and stripping NULs.
    array[:] = elements
    return array.reshape(dims)


def _pack_bytes(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for value in array.reshape(-1).tolist():
        if isinstance(value, bytes | bytearray | memoryview):
            # bytes, np.bytes_ and other buffers go out untouched: a client that sent raw
            # bytes must get the same bytes back, never their repr.
            data = bytes(value)
        elif isinstance(value, str):
            data = value.encode("utf-8")
        else:
            # tritonclient's serialize_byte_tensor sends str() of a non-bytes object, so
            # a number in an object array round-trips as its decimal text.
            data = str(value).encode("utf-8")
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"
