"""The prediction log's record format: what a serving process writes and a control plane reads.

A leaf: it imports nothing of the project, so that serving (the writer,
:mod:`modelloop.serving.predlog`) and monitoring (the reader, :mod:`modelloop.monitoring.ingest`)
share one definition of the Arrow schema without importing each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LOG_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("time", pa.float64(), nullable=False),
        pa.field("latency_s", pa.float32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("input_digest", pa.string(), nullable=False),
        pa.field("inputs", pa.list_(pa.float32()), nullable=False),
        pa.field("outputs", pa.list_(pa.float32()), nullable=False),
    ],
    metadata={"modelloop.log": "2"},
)
"""One row per predicted row: the request it belongs to, its input columns and its outputs.

``input_digest`` identifies the request's whole input (a retry has the same one);
``inputs`` holds the logged input's columns (empty for a BYTES input), ``outputs`` the
logged output's values. Since format 2 a writer leaves the digest empty where the
``inputs`` column holds the input exactly (float32 tensors): :func:`decode_segment` computes
it from those bytes, the same digest the writer would have computed, off the serving CPU.
"""
LOG_FORMAT = "2"
"""The schema version written in the schema's metadata; a reader skips what it does not know."""
READABLE_FORMATS = frozenset({"1", "2"})
"""The formats :func:`decode_segment` reads: 1 (every digest written) and 2 (float32 digests left empty)."""

_F32 = np.dtype(np.float32)
_NUMERIC = "iufb"


@dataclass(frozen=True, slots=True)
class LogColumns:
    """Which tensors of a model version the log keeps.

    Attributes:
        input_name: The input whose columns are logged; None = the request's first input.
        output_name: The output whose values are logged; None = the first numeric output.
    """

    input_name: str | None = None
    output_name: str | None = None


def input_digest(x: np.ndarray) -> str:
    """A digest of one request's input: equal for a retry, different for another input."""
    if x.dtype.kind in _NUMERIC:
        data = np.ascontiguousarray(x).tobytes()
    else:
        data = b"\x00".join(v if isinstance(v, bytes) else str(v).encode() for v in x.reshape(-1).tolist())
    return _digest(data)


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _pick(tensors: dict[str, np.ndarray], name: str | None, numeric: bool) -> np.ndarray | None:
    if name is not None and name in tensors:
        return np.asarray(tensors[name])
    for value in tensors.values():
        array = np.asarray(value)
        if not numeric or array.dtype.kind in _NUMERIC:
            return array
    return None


def _list_array(values: np.ndarray, width: int, rows: int) -> pa.ListArray:
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


def _repeated(value: str, rows: int) -> pa.Array:
    return pa.array([value], type=pa.string()).take(pa.array(np.zeros(rows, dtype=np.int32)))


def _empty_strings(rows: int) -> pa.Array:
    offsets = pa.py_buffer(np.zeros(rows + 1, dtype=np.int32).tobytes())
    return pa.StringArray.from_buffers(rows, offsets, pa.py_buffer(b""))


def encode_batch(items: list[tuple[Any, ...]], columns: LogColumns) -> pa.RecordBatch | None:
    """One record batch of :data:`LOG_SCHEMA` from buffered requests of one model version.

    Requests whose logged tensors share a dtype family and a row width (the usual case: one
    model version, one client library) are encoded with a few array operations for the
    whole batch: one concatenation per column, no work per request beyond picking its two
    tensors. Anything else (a BYTES input, ragged widths, a missing tensor) goes through
    the per-request path, with the same result.

    Args:
        items: ``(model, version, request_id, time, seconds, inputs, outputs[, trace])`` tuples.
        columns: Which input and output to keep.

    Returns:
        The batch, or None when no request had a numeric output to log.
    """
    if not items:
        return None
    batch = _encode_uniform(items, columns)
    return batch if batch is not None else _encode_each(items, columns)


def _uniform_name(tensors: list[dict[str, Any]], name: str | None, numeric: bool) -> str | None:
    """The tensor name every request's pick resolves to, when one name does; else None."""
    if name is not None:
        return name
    first = tensors[0]
    if numeric:
        found = next((k for k, v in first.items() if getattr(v, "dtype", None) is not None), None)
        if found is None or len(first) != 1:
            return None  # several outputs: which is "the first numeric" may differ per request
        return found if all(len(t) == 1 and found in t for t in tensors) else None
    found = next(iter(first), None)
    return found if found is not None and all(next(iter(t), None) == found for t in tensors) else None


def _encode_uniform(items: list[tuple[Any, ...]], columns: LogColumns) -> pa.RecordBatch | None:
    """The vectorised path; None when the requests are not uniform enough for it."""
    inputs = [item[5] for item in items]
    outputs = [item[6] for item in items]
    x_name = _uniform_name(inputs, columns.input_name, numeric=False)
    y_name = _uniform_name(outputs, columns.output_name, numeric=True)
    if x_name is None or y_name is None:
        return None
    try:
        xs = [t[x_name] for t in inputs]
        ys = [t[y_name] for t in outputs]
        counts = np.fromiter(map(len, xs), dtype=np.int64, count=len(xs))
        if not np.array_equal(counts, np.fromiter(map(len, ys), dtype=np.int64, count=len(ys))):
            return None
        x = np.concatenate(xs)
        y = np.concatenate(ys)
    except (KeyError, TypeError, ValueError):  # a missing tensor, a 0-d array, ragged widths
        return None
    if x.dtype.kind not in _NUMERIC or y.dtype.kind not in _NUMERIC or not counts.all():
        return None
    rows = int(counts.sum())
    x = x.reshape(rows, -1)
    y = y.reshape(rows, -1)
    dtypes = set(map(_dtype_of, xs))
    if dtypes == {_F32}:
        digests = _empty_strings(len(xs))  # the reader computes them from the inputs column
    else:
        digests = pa.array([input_digest(np.asarray(v)) for v in xs], type=pa.string())
    ids = pa.array([item[2] for item in items], type=pa.string())
    times = np.fromiter((item[3] for item in items), dtype=np.float64, count=len(items))
    latencies = np.fromiter((item[4] for item in items), dtype=np.float32, count=len(items))
    if rows == len(items):  # one row per request: nothing to repeat
        row_index = np.zeros(rows, dtype=np.int32)
    else:
        repeat = pa.array(np.repeat(np.arange(len(items), dtype=np.int32), counts))
        starts = np.cumsum(counts) - counts
        row_index = (np.arange(rows) - np.repeat(starts, counts)).astype(np.int32)
        ids, digests = ids.take(repeat), digests.take(repeat)
        times, latencies = np.repeat(times, counts), np.repeat(latencies, counts)
    model, version = items[0][0], items[0][1]
    return pa.RecordBatch.from_arrays(
        [
            ids,
            _repeated(model, rows),
            pa.array(np.full(rows, version, dtype=np.int32)),
            pa.array(times),
            pa.array(latencies),
            pa.array(row_index),
            digests,
            _list_array(x.astype(np.float32, copy=False), x.shape[1], rows),
            _list_array(y.astype(np.float32, copy=False), y.shape[1], rows),
        ],
        schema=LOG_SCHEMA,
    )


def _dtype_of(array: Any) -> np.dtype[Any]:
    return np.asarray(array).dtype


def _encode_each(items: list[tuple[Any, ...]], columns: LogColumns) -> pa.RecordBatch | None:
    """The per-request path: any mix of dtypes, widths and missing tensors."""
    ids: list[str] = []
    times: list[float] = []
    latencies: list[float] = []
    digests: list[str] = []
    counts: list[int] = []
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for _, _, rid, created, seconds, inputs, outputs, *_ in items:
        x = _pick(inputs, columns.input_name, numeric=False)
        y = _pick(outputs, columns.output_name, numeric=True)
        if x is None or y is None:
            continue
        n = x.shape[0] if x.ndim else 1
        if (y.shape[0] if y.ndim else 1) != n or n == 0:
            continue
        ids.append(rid)
        times.append(created)
        latencies.append(seconds)
        # A float32 input's digest is left to the reader (format 2), as on the vectorised path.
        digests.append("" if x.dtype == _F32 else input_digest(x))
        counts.append(n)
        xs.append(x.reshape(n, -1) if x.dtype.kind in _NUMERIC else np.zeros((n, 0), np.float32))
        ys.append(y.reshape(n, -1))
    if not ids:
        return None
    widths = {(x.shape[1], y.shape[1]) for x, y in zip(xs, ys, strict=True)}
    model, version = items[0][0], items[0][1]
    repeat = np.repeat(np.arange(len(ids)), counts)
    rows = int(repeat.size)
    row_index = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
    if len(widths) == 1:
        x_width, y_width = widths.pop()
        inputs = _list_array(np.concatenate(xs).astype(np.float32, copy=False), x_width, rows)
        outputs = _list_array(np.concatenate(ys).astype(np.float32, copy=False), y_width, rows)
    else:  # requests of other widths in one batch (a model with variable input length)
        inputs = pa.array([r.astype(np.float32) for x in xs for r in x], type=pa.list_(pa.float32()))
        outputs = pa.array([r.astype(np.float32) for y in ys for r in y], type=pa.list_(pa.float32()))
    taken = pa.array(repeat)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ids, type=pa.string()).take(taken),
            _repeated(model, rows),
            pa.array(np.full(rows, version, dtype=np.int32)),
            pa.array(np.asarray(times, dtype=np.float64)[repeat]),
            pa.array(np.asarray(latencies, dtype=np.float32)[repeat]),
            pa.array(row_index),
            pa.array(digests, type=pa.string()).take(taken),
            inputs,
            outputs,
        ],
        schema=LOG_SCHEMA,
    )


def encode_segment(batches: list[pa.RecordBatch]) -> bytes:
    """An Arrow IPC stream of record batches: one segment of the log."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, LOG_SCHEMA) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_segment(segment: bytes) -> list[pa.RecordBatch]:
    """The record batches of one segment, every ``input_digest`` filled in.

    Raises:
        ValueError: The bytes are not an Arrow stream of this log's format (another
            version wrote them, or they are corrupt).
    """
    try:
        reader = pa.ipc.open_stream(segment)
        schema = reader.schema
        batches = list(reader)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ValueError(f"not an Arrow stream: {exc}") from None
    found = (schema.metadata or {}).get(b"modelloop.log", b"").decode()
    if found not in READABLE_FORMATS or not schema.equals(LOG_SCHEMA, check_metadata=False):
        raise ValueError(f"log format {found or 'unknown'!r}, this reader knows {LOG_FORMAT!r}")
    return [fill_digests(batch) for batch in batches]


def fill_digests(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with each empty ``input_digest`` computed from its request's ``inputs`` rows.

    The bytes hashed are the request's float32 input, row after row: what the writer's
    :func:`input_digest` hashes for a float32 tensor, so a retry still has the same digest
    and another input another one, whichever side computed it.
    """
    digests = batch.column("input_digest")
    if batch.num_rows == 0 or not pc.any(pc.equal(digests, "")).as_py():
        return batch
    rows = batch.num_rows
    starts = np.flatnonzero(batch.column("row").to_numpy(zero_copy_only=False) == 0)
    ends = np.append(starts[1:], rows)
    inputs = batch.column("inputs")
    offsets = inputs.offsets.to_numpy(zero_copy_only=False)
    values = inputs.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    data = memoryview(np.ascontiguousarray(values).tobytes())
    known = digests.to_pylist()
    filled = list(known)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if known[start] == "":
            digest = _digest(data[4 * int(offsets[start]) : 4 * int(offsets[end])])
            filled[start:end] = [digest] * (end - start)
    index = batch.schema.get_field_index("input_digest")
    return batch.set_column(index, LOG_SCHEMA.field(index), pa.array(filled, type=pa.string()))
