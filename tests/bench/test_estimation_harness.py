"""The estimation harness's scenarios and verdicts on synthetic out-of-fold rows; no training here."""

from __future__ import annotations

import numpy as np

from bench.estimation_harness import (
    CLASS_MIX,
    SCENARIOS,
    Pooled,
    evaluate_windows,
    scenario_rows,
    summarise,
)


def _baseline(classes: int) -> dict:
    """A baseline of two features and a uniform prediction mix, with raw probabilities."""
    return {
        "features": [
            {"name": f"f{i}", "index": i, "constant": False, "edges": [0.5], "proportions": [0.5, 0.5]}
            for i in range(2)
        ],
        "predictions": {"kind": "class", "proportions": [1.0 / classes] * classes},
        "calibration": {"method": "none", "held_out": {"ece_before": 0.01, "ece_after": 0.01}},
    }


def _pooled(n: int = 2000, classes: int = 10, seed: int = 0) -> Pooled:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    confidence = rng.uniform(0.6, 1.0, n)
    right = rng.random(n) < confidence  # calibrated: right with the probability answered
    answered = np.where(right, y, (y + 1) % classes)
    outputs = np.full((n, classes), 0.0)
    outputs[np.arange(n), answered] = confidence
    outputs[np.arange(n), (answered + 1) % classes] += 1.0 - confidence
    x = rng.random((n, 2))
    return Pooled(
        x=x,
        y=y,
        fold=np.arange(n) % 2,
        outputs=outputs,
        noisy_x=x,
        noisy_outputs=outputs,
        baselines=[_baseline(classes), _baseline(classes)],
        references=[],
    )


def test_the_scenarios_draw_the_rows_they_say() -> None:
    pooled = _pooled()
    rows = scenario_rows(pooled)
    assert tuple(rows) == SCENARIOS
    mix, _, _, _ = rows["class mix 3,5,8,9"]
    assert set(pooled.y[mix]) == set(CLASS_MIX)
    unsure, _, _, _ = rows["least confident 40 %"]
    assert len(unsure) == int(0.4 * len(pooled.y))
    assert pooled.outputs[unsure].max(axis=1).max() <= np.quantile(pooled.outputs.max(axis=1), 0.4)
    _, x, outputs, labels = rows["concept change"]
    # Inputs and answers unchanged; 1 and 7, 3 and 8 swapped in the labels only.
    assert x is pooled.x and outputs is pooled.outputs
    assert (labels[pooled.y == 1] == 7).all() and (labels[pooled.y == 8] == 3).all()
    assert (labels[pooled.y == 0] == 0).all()


def test_windows_are_scored_and_summarised_per_scenario() -> None:
    windows = evaluate_windows(_pooled(), count=5, seed=0)
    assert len(windows) == 5 * len(SCENARIOS)
    lines = {line["scenario"]: line for line in summarise(windows)}
    normal, mix, concept = lines["normal"], lines["class mix 3,5,8,9"], lines["concept change"]
    assert normal["windows"] == 5 and normal["mae"] < 0.05 and normal["coverage"] >= 4
    # Only four classes of ten: the prediction mix moves, every window.
    assert mix["alerts"]["ModelPredictionDrift"] == 5 and normal["alerts"]["ModelPredictionDrift"] == 0
    # Labels changed meaning: the estimate does not move, the realized accuracy does.
    assert abs(concept["estimate"] - normal["estimate"]) < 0.03
    assert concept["realized"] < normal["realized"] - 0.1
