"""Warm-up from the samples a version ships (TF Serving's TFRecord, warmup.json), else synthetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelloop.layout import PYTHON_MODEL_FILE, TF_SERVING_WARMUP_FILE, WARMUP_JSON_FILE
from modelloop.serving.codecs import tensor_proto
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_prediction_log_pb2 as prediction_log_pb2,
)
from modelloop.serving.types import ModelState
from modelloop.serving.warmup import (
    WarmupError,
    crc32c,
    read_tfrecord,
    read_warmup_samples,
    warm_up,
    write_tfrecord,
)

from .fakes import FakeRuntime, fake_metadata, write_fake_version
from .test_registry import Factory, make_registry


def _predict_log(rows: np.ndarray, name: str = "x") -> bytes:
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.model_spec.name = "m"
    log.predict_log.request.inputs[name].CopyFrom(tensor_proto.from_numpy(rows))
    return log.SerializeToString()


def _write_tf_warmup(version_dir: Path, records: list[bytes]) -> None:
    path = version_dir / TF_SERVING_WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tfrecord(path, records)


def _write_json_warmup(version_dir: Path, requests: object) -> None:
    (version_dir / WARMUP_JSON_FILE).write_text(json.dumps(requests))


def _oip(rows: list[list[float]], name: str = "x") -> dict[str, object]:
    flat = [v for row in rows for v in row]
    return {"inputs": [{"name": name, "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": flat}]}


def test_crc32c_and_tfrecord_round_trip(tmp_path: Path) -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    path = tmp_path / "records"
    write_tfrecord(path, [b"one", b"", b"three" * 100])
    assert read_tfrecord(path) == [b"one", b"", b"three" * 100]
    data = bytearray(path.read_bytes())
    data[14] ^= 0xFF  # a byte of the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(WarmupError, match="record 0 is corrupt"):
        read_tfrecord(path)
    path.write_bytes(bytes(data[:5]))
    with pytest.raises(WarmupError, match="truncated"):
        read_tfrecord(path)


def test_tensorflow_writes_the_same_records(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    path = tmp_path / "tf_records"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(_predict_log(np.ones((2, 3), np.float32)))
    [record] = read_tfrecord(path)
    assert record == _predict_log(np.ones((2, 3), np.float32))


def test_samples_from_both_files_in_order(tmp_path: Path) -> None:
    version = write_fake_version(tmp_path, "m", 1)
    assert read_warmup_samples(version, "m") is None
    _write_tf_warmup(version, [_predict_log(np.full((2, 3), 7, np.float32))])
    _write_json_warmup(version, [_oip([[1, 2, 3]]), _oip([[4, 5, 6], [7, 8, 9], [1, 1, 1]])])
    samples = read_warmup_samples(version, "m")
    assert samples is not None
    assert [s["x"].shape for s in samples] == [(2, 3), (1, 3), (3, 3)]
    np.testing.assert_array_equal(samples[0]["x"], np.full((2, 3), 7))

    runtime = FakeRuntime(fake_metadata())
    assert warm_up(runtime, version, synthetic=True) == 3
    assert runtime.calls == [2, 1, 3]


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda v: _write_json_warmup(v, [_oip([[1, 2, 3]], name="y")]), r"inputs \['y'\]; the model takes"),
        (lambda v: _write_json_warmup(v, [_oip([[1, 2]])]), r"shape \[1, 2\]; the model expects \[-1, 3\]"),
        (lambda v: _write_json_warmup(v, [[1, 2, 3]]), "request 0 is not a JSON object"),
        (lambda v: _write_json_warmup(v, []), "hold no request"),
        (lambda v: (v / WARMUP_JSON_FILE).write_text("{bad"), "not valid JSON"),
        (lambda v: _write_json_warmup(v, {"inputs": "x"}), "request 0: "),
        (lambda v: _write_tf_warmup(v, [b"\xff\xff"]), "not a PredictionLog"),
        (lambda v: _write_tf_warmup(v, [b""]), "empty log"),
    ],
)
def test_bad_samples_are_named(tmp_path: Path, write, message: str) -> None:
    version = write_fake_version(tmp_path, "m", 1)
    write(version)
    with pytest.raises(WarmupError, match=message):
        warm_up(FakeRuntime(fake_metadata()), version, synthetic=True)


def test_classify_logs_are_refused(tmp_path: Path) -> None:
    version = write_fake_version(tmp_path, "m", 1)
    log = prediction_log_pb2.PredictionLog()
    log.classify_log.request.model_spec.name = "m"
    _write_tf_warmup(version, [log.SerializeToString()])
    with pytest.raises(WarmupError, match="classify_log log; this server warms up from predict_log"):
        warm_up(FakeRuntime(fake_metadata()), version, synthetic=True)


async def test_the_registry_sends_the_samples_and_a_failing_sample_fails_the_version(tmp_path: Path) -> None:
    good = write_fake_version(tmp_path, "m", 1)
    _write_json_warmup(good, [_oip([[1, 2, 3], [4, 5, 6]])])
    factory = Factory()
    registry, _ = make_registry(tmp_path, factory)
    await registry.start()
    try:
        assert registry.status("m", 1).state is ModelState.AVAILABLE
        assert factory.built[0].calls == [2]  # the sample, not a synthetic row
        bad = write_fake_version(tmp_path, "m", 2)
        _write_json_warmup(bad, [_oip([[1, 2]])])
        await registry.poll()
        status = registry.status("m", 2)
        assert status.state is ModelState.FAILED and "warm-up request 0" in status.error_message
        assert registry.resolve("m").version == 1  # the previous version keeps serving
    finally:
        await registry.stop()


async def test_python_models_get_no_synthetic_rows_but_do_get_their_samples(tmp_path: Path) -> None:
    plain = write_fake_version(tmp_path, "m", 1)
    (plain / PYTHON_MODEL_FILE).write_text("# the fake factory never runs it\n")
    factory = Factory()
    registry, _ = make_registry(tmp_path, factory)
    await registry.start()
    try:
        assert registry.status("m", 1).state is ModelState.AVAILABLE
        assert factory.built[0].calls == []
        sampled = write_fake_version(tmp_path, "m", 2)
        (sampled / PYTHON_MODEL_FILE).write_text("# the fake factory never runs it\n")
        _write_json_warmup(sampled, _oip([[1, 2, 3]]))  # one request, not in a list
        await registry.poll()
        assert registry.status("m", 2).state is ModelState.AVAILABLE
        assert factory.built[1].calls == [1]
    finally:
        await registry.stop()


async def test_built_in_runtimes_without_samples_still_get_one_synthetic_row(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    factory = Factory()
    registry, _ = make_registry(tmp_path, factory)
    await registry.start()
    try:
        assert factory.built[0].calls == [1]
    finally:
        await registry.stop()
