"""bench.points: the helpers of the shared memory and cold-load points (the points run in make bench)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.points import _copy_digits, _quantile


def test_quantiles_pick_ranked_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert _quantile(values, 0.5) == 51.0  # round(49.5) is 50 (banker's rounding): the 51st value
    assert _quantile(values, 0.99) == 99.0
    assert _quantile([3.0], 0.99) == 3.0


def test_copies_are_renamed_and_configured(tmp_path: Path) -> None:
    version = tmp_path / "repo" / "digits" / "1"
    version.mkdir(parents=True)
    (version / "model.json").write_text(json.dumps({"name": "digits", "version": 1}))
    (version / "model.onnx").write_bytes(b"onnx")
    out = _copy_digits(tmp_path / "repo", tmp_path / "out", ["a", "b"], {"max_batch_size": 4})
    assert json.loads((out / "b" / "1" / "model.json").read_text())["name"] == "b"
    assert json.loads((out / "a" / "config.json").read_text()) == {"batching": {"max_batch_size": 4}}
    assert (out / "a" / "1" / "model.onnx").read_bytes() == b"onnx"


def test_the_logger_point_logs_every_request_it_measures() -> None:
    from bench.predlog import measure

    result = measure(300, "null")
    assert result["dropped"] == 0 and result["segments"] >= 1
    assert result["requests"] == 300 and result["on_us_per_prediction"] > 0
