"""warmup.json: OIP infer requests from sample rows, for every exported version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelloop.export.warmup import warmup_requests, write_warmup_requests


def test_one_row_then_a_batch() -> None:
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    first, batch = warmup_requests({"x": rows})
    assert first == {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.0, 1.0, 2.0]}]}
    assert batch["inputs"][0]["shape"] == [8, 3]
    assert warmup_requests({"x": rows[:1]}) == [first]


def test_strings_are_bytes_tensors(tmp_path: Path) -> None:
    texts = np.array([b"twelve", "caf\u00e9".encode(), b"3"], dtype=object).reshape(3, 1)
    path = write_warmup_requests(tmp_path, {"text": texts, "n": np.array([[1], [2], [3]], np.int64)})
    [first, batch] = json.loads(path.read_text())
    assert first["inputs"][0] == {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["twelve"]}
    assert batch["inputs"][0]["data"] == ["twelve", "caf\u00e9", "3"]
    assert batch["inputs"][1] == {"name": "n", "shape": [3, 1], "datatype": "INT64", "data": [1, 2, 3]}


def test_no_rows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one row"):
        write_warmup_requests(tmp_path, {"x": np.zeros((0, 3), np.float32)})
