"""bench/control_plane.py: its reader stores every logged prediction once, and reports lag."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.control_plane import measure_lag, measure_throughput, render, run


def test_the_throughput_point_stores_every_logged_prediction_once(tmp_path: Path) -> None:
    stored, wall, cpu = measure_throughput(tmp_path, 2_500, 1_000)
    assert stored == 2_500
    assert wall > 0 and cpu > 0


def test_the_lag_point_measures_every_prediction_written(tmp_path: Path) -> None:
    lags = measure_lag(tmp_path, rate=2_000, duration=1.0)
    # The writer appends what is due every 0.25 s: about 2,000 predictions in a second.
    assert 1_000 <= lags.size <= 3_000
    assert np.all(lags >= 0)


def test_the_report_names_each_target_and_its_verdict() -> None:
    figures = run(requests=1_000, per_segment=500, rate=1_000, lag_duration=0.5)
    text = render(figures)
    assert figures.predictions == 1_000
    assert "≥ 20,000" in text and "≤ 5 s" in text
    assert text.count("| met |") + text.count("| NOT met |") == 2
