"""Warm-up of a new model version: the samples it ships, else one synthetic batch.

A version directory may ship warm-up requests, read here without TensorFlow:

- ``assets.extra/tf_serving_warmup_requests``: TF Serving's file, a TFRecord of
  ``PredictionLog`` records whose ``predict_log.request`` is a ``PredictRequest`` (parsed
  with the generated protos of :mod:`modelloop.serving.protos.tfserving`; the length and
  data checksums of each record are verified).
- ``warmup.json``: a JSON array of Open Inference Protocol infer requests (the body of
  ``POST /v2/models/<m>/infer``, JSON tensors), or one such request.

When a version ships samples, they are what warm-up sends, every one of them, and any
failure (a file that does not parse, a sample that does not fit the model, a runtime
error, missing outputs) fails the version. Without samples, a built-in runtime (ONNX,
SavedModel) is warmed with one synthetic row (zeros, empty strings); a Python model
(``model.py``) is sent nothing: its ``load`` is its warm-up, and synthetic values are
not data its code need accept.

Example:

```python
sent = warm_up(runtime, version_dir, synthetic=True)  # samples sent, or 1 synthetic
```
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import orjson

from modelloop.layout import TF_SERVING_WARMUP_FILE, WARMUP_JSON_FILE
from modelloop.serving.codecs import tensor_proto, v2_json
from modelloop.serving.errors import InvalidInput
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_prediction_log_pb2 as prediction_log_pb2,
)
from modelloop.serving.runtime import Runtime
from modelloop.serving.types import ModelMetadata

MAX_WARMUP_REQUESTS = 1000
"""The most samples one version may ship (TF Serving's limit too)."""

Tensors = dict[str, np.ndarray]


class WarmupError(ValueError):
    """A version's warm-up samples are unreadable, do not fit the model, or failed on it."""


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files.

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked checksum of ``data``."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecord(path: Path) -> list[bytes]:
    """The records of a TFRecord file (uncompressed), checksums verified.

    Raises:
        WarmupError: A truncated record or a checksum that does not match.
    """
    data = path.read_bytes()
    records: list[bytes] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 12:
            raise WarmupError(f"{path.name}: truncated record header at byte {offset}")
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc32c(header) != length_crc:
            raise WarmupError(f"{path.name}: record {len(records)} has a corrupt length (checksum mismatch)")
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            raise WarmupError(f"{path.name}: record {len(records)} is truncated")
        payload = data[start:end]
        (data_crc,) = struct.unpack("<I", data[end : end + 4])
        if masked_crc32c(payload) != data_crc:
            raise WarmupError(f"{path.name}: record {len(records)} is corrupt (checksum mismatch)")
        records.append(payload)
        if len(records) > MAX_WARMUP_REQUESTS:
            raise WarmupError(f"{path.name}: more than {MAX_WARMUP_REQUESTS} warm-up records")
        offset = end + 4
    return records


def write_tfrecord(path: Path, records: list[bytes]) -> None:
    """Writes ``records`` as a TFRecord file (what TensorFlow's ``TFRecordWriter`` writes)."""
    with path.open("wb") as f:
        for record in records:
            header = struct.pack("<Q", len(record))
            f.write(header + struct.pack("<I", masked_crc32c(header)))
            f.write(record + struct.pack("<I", masked_crc32c(record)))


def _tf_serving_samples(path: Path) -> list[Tensors]:
    samples: list[Tensors] = []
    for index, record in enumerate(read_tfrecord(path)):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record)
        except Exception as exc:  # protobuf raises DecodeError or RuntimeError
            raise WarmupError(f"{path.name}: record {index} is not a PredictionLog: {exc}") from exc
        kind = log.WhichOneof("log_type")
        if kind != "predict_log":
            raise WarmupError(
                f"{path.name}: record {index} is a {kind or 'empty'} log; this server warms up "
                "from predict_log records only"
            )
        try:
            request = tensor_proto.decode_predict_request(log.predict_log.request)
        except InvalidInput as exc:
            raise WarmupError(f"{path.name}: record {index}: {exc}") from exc
        samples.append(request.inputs)
    return samples


def _json_samples(path: Path, model: str) -> list[Tensors]:
    try:
        document = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise WarmupError(f"{path.name} is not valid JSON: {exc}") from exc
    items = document if isinstance(document, list) else [document]
    if len(items) > MAX_WARMUP_REQUESTS:
        raise WarmupError(f"{path.name}: more than {MAX_WARMUP_REQUESTS} warm-up requests")
    samples: list[Tensors] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise WarmupError(f"{path.name}: request {index} is not a JSON object (an OIP infer request)")
        try:
            call = v2_json.decode_infer_request(orjson.dumps(item), model=model)
        except InvalidInput as exc:
            raise WarmupError(f"{path.name}: request {index}: {exc}") from exc
        samples.append(call.request.inputs)
    return samples


def read_warmup_samples(version_dir: Path, model: str) -> list[Tensors] | None:
    """The warm-up samples a version ships, or None when it ships none.

    Both files may be present; their samples are sent in order (TF Serving's first).

    Raises:
        WarmupError: A file is unreadable or holds no usable request.
    """
    found = False
    samples: list[Tensors] = []
    tf_file = version_dir / TF_SERVING_WARMUP_FILE
    if tf_file.is_file():
        found = True
        samples += _tf_serving_samples(tf_file)
    json_file = version_dir / WARMUP_JSON_FILE
    if json_file.is_file():
        found = True
        samples += _json_samples(json_file, model)
    if not found:
        return None
    if not samples:
        raise WarmupError("the version's warm-up files hold no request")
    return samples


def _fit(sample: Tensors, metadata: ModelMetadata, index: int) -> Tensors:
    """A sample in the model's input order and dtypes (casts that keep the values only)."""
    expected = [spec.name for spec in metadata.inputs]
    if sorted(sample) != sorted(expected):
        raise WarmupError(f"warm-up request {index} has inputs {sorted(sample)}; the model takes {expected}")
    fitted: Tensors = {}
    for spec in metadata.inputs:
        value = np.asarray(sample[spec.name])
        if value.ndim != len(spec.shape) or any(
            d != -1 and got != d for got, d in zip(value.shape, spec.shape, strict=True)
        ):
            raise WarmupError(
                f"warm-up request {index}: input {spec.name!r} has shape {list(value.shape)}; "
                f"the model expects {list(spec.shape)}"
            )
        if value.dtype != spec.dtype:
            if (value.dtype.kind in "OSU") != (spec.dtype.kind in "OSU"):
                raise WarmupError(
                    f"warm-up request {index}: input {spec.name!r} is {value.dtype.name}; "
                    f"the model expects {spec.dtype.name}"
                )
            value = value.astype(spec.dtype)
        fitted[spec.name] = value
    rows = {v.shape[0] for v in fitted.values()}
    if len(rows) > 1:
        raise WarmupError(f"warm-up request {index}: inputs have different batch sizes {sorted(rows)}")
    return fitted


def synthetic_inputs(metadata: ModelMetadata, rows: int = 1) -> Tensors:
    """A synthetic batch for ``metadata``: zeros, free dims set to 1, batch dim to ``rows``."""
    batch: Tensors = {}
    for spec in metadata.inputs:
        shape = (rows, *(1 if d < 0 else d for d in spec.shape[1:]))
        batch[spec.name] = np.zeros(shape, dtype=spec.dtype) if spec.dtype != object else np.full(shape, b"")
    return batch


def _check_outputs(outputs: Tensors, metadata: ModelMetadata, rows: int, what: str) -> None:
    for spec in metadata.outputs:
        if spec.name not in outputs:
            raise WarmupError(f"warmup: the model returned {sorted(outputs)}, not output {spec.name!r}")
        if np.shape(outputs[spec.name])[:1] != (rows,):
            raise WarmupError(
                f"warmup: output {spec.name!r} has shape {np.shape(outputs[spec.name])} for {what} "
                f"of {rows} rows"
            )


def warm_up(runtime: Runtime, version_dir: Path, *, synthetic: bool) -> int:
    """Sends a loaded runtime its warm-up: the version's samples, else one synthetic row.

    Args:
        runtime: The loaded runtime.
        version_dir: The version directory (where the sample files are).
        synthetic: Whether a version without samples gets one synthetic row; False for
            runtimes that run a model's own code (Python models).

    Returns:
        How many requests were sent (0: none).

    Raises:
        WarmupError: The samples are unreadable or do not fit; the model failed on one or
            answered without an output.
        Exception: Whatever the runtime raised on a sample, with the sample's index.
    """
    metadata = runtime.metadata
    samples = read_warmup_samples(version_dir, metadata.name)
    if samples is None:
        if not synthetic:
            return 0
        _check_outputs(runtime.predict(synthetic_inputs(metadata)), metadata, 1, "a synthetic batch")
        return 1
    for index, sample in enumerate(samples):
        inputs = _fit(sample, metadata, index)
        rows = next(iter(inputs.values())).shape[0]
        try:
            outputs = runtime.predict(inputs)
        except Exception as exc:
            raise WarmupError(f"warm-up request {index} failed: {type(exc).__name__}: {exc}") from exc
        _check_outputs(outputs, metadata, rows, f"warm-up request {index}")
    return len(samples)
