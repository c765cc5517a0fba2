"""The health fragment's verdicts: each a chip whose class and words agree, values escaped."""

from __future__ import annotations

import re
from typing import Any

from modelloop.monitoring.page import render_health
from modelloop.monitoring.verdicts import ModelView, VersionView, render_verdicts


def _point(**values: Any) -> dict[str, Any]:
    point: dict[str, Any] = {
        "t": 1000.0,
        "accuracy": None,
        "estimated_accuracy": None,
        "estimated_accuracy_lower": None,
        "estimated_accuracy_upper": None,
        "drift_share": None,
        "drift_detected": None,
        "top_drifted_features": [],
        "prediction_drift": None,
        "missing_share": None,
        "out_of_range_share": None,
        "constant_features": [],
        "request_rate": None,
        "error_rate": None,
        "p99_seconds": None,
        "window_rows": 200,
    }
    point.update(values)
    return point


def _chips(fragment: str) -> dict[str, tuple[str, str]]:
    """``data-verdict`` -> (class, text) of every chip; the last one of a kind wins."""
    found = re.findall(r'<span class="chip (\w+)" data-verdict="([\w-]+)"[^>]*>([^<]*)</span>', fragment)
    return {kind: (verdict, text) for verdict, kind, text in found}


def test_a_drifted_model_below_its_floor_reads_bad_in_words_and_classes() -> None:
    drifted = _point(
        accuracy=0.62,
        estimated_accuracy=0.95,
        estimated_accuracy_lower=0.88,
        estimated_accuracy_upper=0.97,
        drift_share=0.61,
        drift_detected=True,
        top_drifted_features=[{"feature": "<px>", "psi": 0.8}],
        prediction_drift=0.4,
        missing_share=0.0,
        out_of_range_share=0.3,
        request_rate=12.0,
        error_rate=0.0,
        p99_seconds=0.004,
    )
    model = ModelView(
        name="digits",
        versions=[VersionView(version=1, state="AVAILABLE", points=[drifted])],
        accuracy_floor=0.9,
        quarantined={"team-<b>": ["disagrees with the champion"]},
        retrain_runs={"blessed": 1},
    )
    fragment = render_verdicts(model)
    chips = _chips(fragment)
    assert chips["drift"] == ("bad", "DRIFT 61%")
    assert chips["prediction-drift"] == ("warn", "prediction drift 0.400 (alert level)")
    assert chips["accuracy"] == ("bad", "accuracy 0.620, below the floor 0.90")
    assert chips["estimate"] == ("warn", "estimated 0.950 (0.880–0.970), band reaches the floor")
    assert chips["quality"][0] == "warn" and "out of range 30.0%" in chips["quality"][1]
    assert chips["traffic"] == ("ok", "12.0 req/s · 0.0% server errors · p99 4.0 ms")
    assert chips["labelers"] == ("bad", "quarantined labelers: team-&lt;b&gt;")
    assert chips["retrain"] == ("idle", "retrain runs since start: 1 blessed, 0 rejected, 0 failed")
    assert "&lt;px&gt; (0.80)" in fragment and "<px>" not in fragment and "team-<b>" not in fragment
    assert '<span class="vstate">AVAILABLE</span>' in fragment


def test_a_healthy_model_reads_ok_and_a_new_one_idle() -> None:
    healthy = _point(
        accuracy=0.97,
        estimated_accuracy=0.98,
        estimated_accuracy_lower=0.96,
        estimated_accuracy_upper=0.99,
        drift_share=0.02,
        drift_detected=False,
        prediction_drift=0.01,
        missing_share=0.0,
        out_of_range_share=0.0,
    )
    model = ModelView(
        name="digits",
        versions=[
            VersionView(version=1, state="AVAILABLE", points=[healthy]),
            VersionView(version=2, state="LOADING", points=[], estimate_note="no calibrator"),
        ],
        accuracy_floor=0.9,
    )
    fragment = render_health([model], t0=0.0, t1=1800.0)
    v1 = fragment.split('data-version="1"', 1)[1].split('data-version="2"', 1)[0]
    assert {kind: verdict for kind, (verdict, _) in _chips(v1).items()} == {
        "drift": "ok",
        "prediction-drift": "ok",
        "accuracy": "ok",
        "estimate": "ok",
        "quality": "ok",
        "traffic": "idle",
    }
    assert "No evaluation yet" in fragment.split('data-version="2"', 1)[1]
    assert _chips(fragment)["labelers"] == ("ok", "no labeler quarantined")
    # The curves follow the verdicts, in the same section.
    assert fragment.index('class="verdicts"') < fragment.index('class="charts"')
