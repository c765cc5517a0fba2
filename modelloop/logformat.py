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
    metadata={"modelloop.log": "1"},
)
"""One row per predicted row: the request it belongs to, its input columns and its outputs.

``input_digest`` identifies the request's whole input (a retry has the same one);
``inputs`` holds the logged input's columns (empty for a BYTES input), ``outputs`` the
logged output's values.
"""
LOG_FORMAT = "1"
"""The schema version written in the schema's metadata; a reader skips what it does not know."""


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
    if x.dtype.kind in "iufb":
        data = np.ascontiguousarray(x).tobytes()
    else:
        data = b"\x00".join(v if isinstance(v, bytes) else str(v).encode() for v in x.reshape(-1).tolist())
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _pick(tensors: dict[str, np.ndarray], name: str | None, numeric: bool) -> np.ndarray | None:
    if name is not None and name in tensors:
        return np.asarray(tensors[name])
    for value in tensors.values():
        array = np.asarray(value)
        if not numeric or array.dtype.kind in "iufb":
            return array
    return None


def _list_array(values: np.ndarray, width: int, rows: int) -> pa.ListArray:
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


def encode_batch(items: list[tuple[Any, ...]], columns: LogColumns) -> pa.RecordBatch | None:
    """One record batch of :data:`LOG_SCHEMA` from buffered requests of one model version.

    Args:
        items: ``(model, version, request_id, time, seconds, inputs, outputs[, trace])`` tuples.
        columns: Which input and output to keep.

    Returns:
        The batch, or None when no request had a numeric output to log.
    """
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
        digests.append(input_digest(x))
        counts.append(n)
        xs.append(x.reshape(n, -1) if x.dtype.kind in "iufb" else np.zeros((n, 0), np.float32))
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
            pa.array(np.full(rows, model, dtype=object), type=pa.string()),
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
    """The record batches of one segment.

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
    if found != LOG_FORMAT or not schema.equals(LOG_SCHEMA, check_metadata=False):
        raise ValueError(f"log format {found or 'unknown'!r}, this reader knows {LOG_FORMAT!r}")
    return batches
