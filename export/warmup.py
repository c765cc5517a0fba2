"""The warm-up samples an exported version ships: ``warmup.json``, OIP infer requests.

The server sends them to a new version before it takes traffic (and fails the version
when one fails), so a version is warmed with real rows rather than zeros. Two requests:
one row, then a batch of up to :data:`BATCH_ROWS` rows, so both the single-row and the
batched shapes of the runtime are exercised.

Example:

```python
write_warmup_requests(staged, {"pixels": split["x_val"]})
```
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modelloop.layout import WARMUP_JSON_FILE

BATCH_ROWS = 8
"""Rows of the second (batched) warm-up request."""

_DATATYPES = {
    "bool": "BOOL",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _tensor(name: str, values: np.ndarray) -> dict[str, object]:
    if values.dtype.kind in "OSU":
        datatype = "BYTES"
        data: list[object] = [_text(v) for v in values.ravel().tolist()]
    else:
        datatype = _DATATYPES[values.dtype.name]
        data = values.ravel().tolist()
    return {"name": name, "shape": list(values.shape), "datatype": datatype, "data": data}


def warmup_requests(inputs: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Two OIP infer requests from sample rows: the first row, then up to ``BATCH_ROWS`` rows.

    Args:
        inputs: Sample rows by served input name; they share their first dimension.

    Returns:
        The requests (one only when there is a single row).
    """
    rows = min(len(v) for v in inputs.values())
    sizes = [1] if rows <= 1 else [1, min(rows, BATCH_ROWS)]
    return [{"inputs": [_tensor(name, np.asarray(v)[:size]) for name, v in inputs.items()]} for size in sizes]


def write_warmup_requests(version_dir: Path, inputs: dict[str, np.ndarray]) -> Path:
    """Writes ``warmup.json`` into a (staged) version directory.

    Args:
        version_dir: The version directory.
        inputs: Sample rows by served input name (at least one row).

    Returns:
        The file written.

    Raises:
        ValueError: No rows.
    """
    if not inputs or min(len(v) for v in inputs.values()) == 0:
        raise ValueError("warm-up samples need at least one row")
    path = version_dir / WARMUP_JSON_FILE
    path.write_text(json.dumps(warmup_requests(inputs)) + "\n")
    return path
