"""The prediction logger: what the request path hands over, what a segment holds, and what
happens when the log cannot be written."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from modelloop.errors import ErrorCode, ServiceError
from modelloop.serving.predlog import (
    LOG_SCHEMA,
    LogColumns,
    PredictionLogger,
    decode_segment,
    encode_batch,
    encode_segment,
    input_digest,
)
from modelloop.serving.types import InferRequest, InferResponse, Protocol


class MemorySink:
    """Keeps segments in memory; fails while ``down`` is set."""

    def __init__(self) -> None:
        self.segments: list[bytes] = []
        self.down = threading.Event()

    def append(self, segment: bytes, *, rows: int) -> None:
        if self.down.is_set():
            raise ServiceError("the log is down", ErrorCode.UNAVAILABLE)
        self.segments.append(segment)

    def batches(self) -> list[pa.RecordBatch]:
        return [b for s in self.segments for b in decode_segment(s)]


def _answer(
    logger: PredictionLogger, rid: str, rows: int = 2, model: str = "digits", version: int = 1
) -> None:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + len(rid)
    y = np.full((rows, 3), 0.5, np.float32)
    logger.observe(
        InferRequest(model, {"pixels": x, "mask": np.ones((rows, 1), np.int64)}, Protocol.V2_REST, id=rid),
        InferResponse(
            model, version, {"classes": np.array([b"a"] * rows), "probabilities": y}, id=rid, seconds=0.002
        ),
    )


def test_a_segment_holds_one_row_per_predicted_row_with_its_request() -> None:
    sink = MemorySink()
    logger = PredictionLogger(sink, columns=lambda m, v: LogColumns("pixels", "probabilities"))
    logger.start()
    try:
        _answer(logger, "a", rows=2)
        _answer(logger, "bb", rows=1)
        _answer(logger, "c", rows=3, version=2)
        assert logger.flush(timeout=10)
    finally:
        logger.stop()
    table = pa.Table.from_batches(sink.batches())
    assert table.schema.equals(LOG_SCHEMA, check_metadata=False)
    assert table.num_rows == 6
    assert sorted(table.column("request_id").to_pylist()) == ["a", "a", "bb", "c", "c", "c"]
    rows = table.to_pylist()
    first_a = next(r for r in rows if r["request_id"] == "a")
    assert first_a["version"] == 1 and first_a["row"] == 0 and first_a["latency_s"] == pytest.approx(0.002)
    assert first_a["inputs"] == [1.0, 2.0, 3.0, 4.0]  # pixels row 0, + len("a")
    assert first_a["outputs"] == [0.5, 0.5, 0.5]  # the named numeric output, not the strings
    assert {r["version"] for r in rows if r["request_id"] == "c"} == {2}
    # One digest per request, the same on each of its rows.
    digests = {r["request_id"]: r["input_digest"] for r in rows}
    assert len(set(digests.values())) == 3
    assert all(r["input_digest"] == digests[r["request_id"]] for r in rows)


def test_the_digest_tells_a_retry_from_another_input() -> None:
    x = np.ones((2, 4), np.float32)
    assert input_digest(x) == input_digest(x.copy())
    assert input_digest(x) != input_digest(x * 2)
    text = np.array([b"SSN 078", b"2.0"], dtype=object)
    assert input_digest(text) == input_digest(text.copy()) != input_digest(text[::-1].copy())


def test_a_bytes_input_is_logged_without_columns_but_with_its_outputs() -> None:
    items = [
        (
            "topics",
            1,
            "t1",
            1.0,
            0.01,
            {"text": np.array([b"hello", b"world"], dtype=object)},
            {"p": np.ones((2, 2))},
        )
    ]
    batch = encode_batch(items, LogColumns())
    assert batch is not None and batch.num_rows == 2
    assert batch.column("inputs").to_pylist() == [[], []]
    assert batch.column("outputs").to_pylist() == [[1.0, 1.0], [1.0, 1.0]]


def test_decode_refuses_what_another_version_wrote() -> None:
    other = pa.schema([pa.field("request_id", pa.string())], metadata={"modelloop.log": "99"})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, other) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays([pa.array(["x"])], schema=other))
    with pytest.raises(ValueError, match="log format '99'"):
        decode_segment(sink.getvalue().to_pybytes())
    with pytest.raises(ValueError, match="not an Arrow stream"):
        decode_segment(b"garbage")
    assert decode_segment(encode_segment([])) == []


def test_log_sample_keeps_that_share_of_requests() -> None:
    sink = MemorySink()
    logger = PredictionLogger(sink, sample=lambda model: 0.25 if model == "digits" else 1.0)
    logger.start()
    try:
        for i in range(2000):
            _answer(logger, f"r{i}", rows=1)
        for i in range(50):
            _answer(logger, f"o{i}", rows=1, model="other")
        assert logger.flush(timeout=10)
    finally:
        logger.stop()
    ids = pa.Table.from_batches(sink.batches()).column("request_id").to_pylist()
    digits = sum(1 for rid in ids if rid.startswith("r"))
    assert 400 <= digits <= 600  # 500 expected; binomial sd ~19
    assert sum(1 for rid in ids if rid.startswith("o")) == 50
    assert logger.dropped == 0


def test_a_full_buffer_drops_and_counts_never_blocks() -> None:
    drops: list[tuple[str, int]] = []
    logger = PredictionLogger(MemorySink(), queue_size=5, on_drop=lambda m, n: drops.append((m, n)))
    for i in range(8):  # the writer is not started: the buffer fills
        _answer(logger, f"r{i}")
    assert logger.dropped == 3 and drops == [("digits", 1)] * 3
    assert logger.pending == 5


def test_a_failing_sink_keeps_segments_retries_and_then_drops_the_oldest() -> None:
    sink = MemorySink()
    drops: list[tuple[str, int]] = []
    logger = PredictionLogger(
        sink, flush_interval_s=0.01, max_pending_segments=2, on_drop=lambda m, n: drops.append((m, n))
    )
    sink.down.set()
    logger.start()
    try:
        for i in range(4):
            _answer(logger, f"r{i}")
            assert not logger.flush(timeout=0.2)  # one segment per flush, kept while the sink is down
        assert logger.dropped >= 1 and sum(n for _, n in drops) == logger.dropped
        sink.down.clear()
        assert logger.flush(timeout=10)
    finally:
        logger.stop()
    logged = pa.Table.from_batches(sink.batches()).column("request_id").to_pylist()
    assert len(set(logged)) + logger.dropped == 4 and "r3" in logged


def _item(rid: str, x: np.ndarray, y: np.ndarray, model: str = "digits") -> tuple[object, ...]:
    return (model, 1, rid, 1.0, 0.001, {"pixels": x}, {"probabilities": y})


def test_a_float32_digest_is_left_to_the_reader_and_is_the_writers_digest() -> None:
    x1 = np.arange(8, dtype=np.float32).reshape(2, 4)
    x2 = np.ones((1, 4), np.float32)
    y = np.full((2, 3), 0.5, np.float32)
    batch = encode_batch([_item("a", x1, y), _item("b", x2, y[:1])], LogColumns("pixels", "probabilities"))
    assert batch is not None
    assert batch.column("input_digest").to_pylist() == ["", "", ""]  # nothing hashed on the serving CPU
    (decoded,) = decode_segment(encode_segment([batch]))
    assert decoded.column("input_digest").to_pylist() == [input_digest(x1)] * 2 + [input_digest(x2)]
    assert decoded.column("row").to_pylist() == [0, 1, 0]
    assert decoded.column("request_id").to_pylist() == ["a", "a", "b"]


def test_other_dtypes_are_digested_by_the_writer_on_both_paths() -> None:
    x = np.arange(4, dtype=np.float64).reshape(1, 4) + 0.1  # float32 would lose the digits
    y = np.ones((1, 3), np.float32)
    columns = LogColumns("pixels", "probabilities")
    uniform = encode_batch([_item("a", x, y), _item("b", x + 1, y)], columns)
    ragged = encode_batch([_item("a", x, y), _item("c", np.ones((1, 2)), y)], columns)  # per request
    assert uniform is not None and ragged is not None
    assert uniform.column("input_digest").to_pylist() == [input_digest(x), input_digest(x + 1)]
    assert ragged.column("input_digest").to_pylist()[0] == input_digest(x)
    assert ragged.column("inputs").to_pylist()[1] == [1.0, 1.0]


def test_the_vectorised_and_per_request_paths_write_the_same_rows() -> None:
    rng = np.random.default_rng(1)
    items = [
        _item(f"r{i}", rng.random((n, 4), dtype=np.float32), rng.random((n, 3), dtype=np.float32))
        for i, n in enumerate([1, 3, 2, 1])
    ]
    fast = encode_batch(items, LogColumns("pixels", "probabilities"))
    # An extra string output makes "the first numeric output" a per-request pick.
    slow_items = [(*item[:6], {"label": np.array([b"x"]), **item[6]}) for item in items]
    slow = encode_batch(slow_items, LogColumns("pixels", None))
    assert fast is not None and slow is not None
    assert pa.Table.from_batches([fast]).equals(pa.Table.from_batches([slow]))
    (decoded,) = decode_segment(encode_segment([fast]))
    digests = decoded.column("input_digest").to_pylist()
    assert digests[1:4] == [input_digest(items[1][5]["pixels"])] * 3


def test_a_segment_of_format_1_is_still_read() -> None:
    x = np.ones((1, 4), np.float32)
    y = np.ones((1, 3), np.float32)
    batch = encode_batch([_item("old", x, y)], LogColumns("pixels", "probabilities"))
    assert batch is not None
    written = batch.set_column(6, LOG_SCHEMA.field(6), pa.array(["0" * 32]))  # v1 wrote every digest
    old = LOG_SCHEMA.with_metadata({"modelloop.log": "1"})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, old) as writer:
        writer.write_batch(written.replace_schema_metadata(old.metadata))
    (decoded,) = decode_segment(sink.getvalue().to_pybytes())
    assert decoded.column("input_digest").to_pylist() == ["0" * 32]
    assert decoded.column("request_id").to_pylist() == ["old"]
