"""How well the label-free accuracy estimate (CBPE) tracks realized accuracy on digits.

``python -m bench.cbpe [--folds 5] [--epochs N] [--windows 10]`` trains the built-in
``digits`` spec once per fold of a stratified K-fold split, through the project's own
training job (which fits the calibrator on each run's test split and stores it in
``baseline.json``). Each fold's held-out rows are answered by the model that never saw
them and estimated with that run's calibrator, exactly as the server does
(:class:`~modelloop.monitoring.estimation.AccuracyEstimator`). The pooled out-of-fold
rows (all 1,797 digits) then make 500-row windows, drawn without replacement, for each
scenario:

- covariate shifts, rows selected on their inputs only: ``little ink`` (the 40 % of
  digits with the least total ink), ``much ink`` (the 40 % with the most), ``least sure``
  (the 35 % whose top softmax probability is lowest: what the model is least sure of);
- ``no shift``: random rows;
- ``inverted digits``, a concept change (``16 − x`` plus noise, as ``modelloop simulate
  --drift`` sends): where the estimate is documented to fail.

It prints one line per window and a summary per scenario, and writes
``bench/results/cbpe.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = 500
RESULTS = Path(__file__).resolve().parent / "results"


def out_of_fold(folds: int, epochs: int | None, seed: int) -> dict[str, np.ndarray]:
    """Trains one digits run per fold; returns the pooled held-out rows and their answers."""
    import keras
    from sklearn.model_selection import StratifiedKFold

    from modelloop.monitoring.estimation import AccuracyEstimator
    from modelloop.monitoring.simulate import drift_digits
    from modelloop.training.calibration import predicted_classes
    from modelloop.training.spec import Dataset, load_spec
    from modelloop.training.train import train

    spec = load_spec("digits")
    data = spec.load_data()
    rng = np.random.default_rng(seed)
    inverted = drift_digits(data.x, rng)
    n = len(data.y)
    pooled: dict[str, np.ndarray] = {
        "x": data.x,
        "y": data.y,
        "fold": np.zeros(n, np.int64),
        "confidence": np.zeros(n),
        "correct": np.zeros(n),
        "q": np.zeros(n),
        "inverted_correct": np.zeros(n),
        "inverted_q": np.zeros(n),
    }
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with tempfile.TemporaryDirectory(prefix="cbpe-") as tmp:
        for k, (fit_rows, held) in enumerate(splitter.split(data.x, data.y)):
            subset = Dataset(data.x[fit_rows], data.y[fit_rows], data.feature_names, data.class_labels)
            fold_spec = dataclasses.replace(spec, load_data=lambda subset=subset: subset)
            run = Path(tmp) / f"fold{k}"
            train(fold_spec, run, epochs=epochs, seed=seed, interactive=False)
            baseline = json.loads((run / "baseline.json").read_text())
            estimator = AccuracyEstimator.from_baseline(baseline, task="multiclass")
            model = keras.models.load_model(run / "model.keras")
            for prefix, rows in (("", data.x[held]), ("inverted_", inverted[held])):
                outputs = model.predict(rows, verbose=0)
                predicted = predicted_classes(outputs)
                pooled[f"{prefix}correct"][held] = predicted == data.y[held]
                q = estimator.confidences(outputs)
                assert q is not None and len(q) == len(held), "the run has no calibrator"
                pooled[f"{prefix}q"][held] = q
                if not prefix:
                    pooled["confidence"][held] = outputs.max(axis=1)
            pooled["fold"][held] = k
            cal = baseline["calibration"]
            print(
                f"fold {k}: {len(fit_rows)} rows to train on, {len(held)} held out; calibrator "
                f"{cal['method']} on {cal['rows']} rows of the {cal['fitted_on']} (held-out ECE "
                f"{cal['held_out']['ece_before']:.4f} -> {cal['held_out']['ece_after']:.4f})",
                flush=True,
            )
    return pooled


def scenarios(pooled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row masks of each scenario; every covariate shift selects on inputs (or outputs) only."""
    ink = pooled["x"].sum(axis=1)
    confidence = pooled["confidence"]
    everything = np.ones(len(ink), bool)
    return {
        "no shift": everything,
        "little ink": ink <= np.quantile(ink, 0.40),
        "much ink": ink >= np.quantile(ink, 0.60),
        "least sure": confidence <= np.quantile(confidence, 0.35),
        "inverted digits": everything,
    }


def windows(pooled: dict[str, np.ndarray], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` windows of 500 rows per scenario, without replacement inside a window."""
    rng = np.random.default_rng(seed)
    found: list[dict[str, Any]] = []
    for name, mask in scenarios(pooled).items():
        prefix = "inverted_" if name == "inverted digits" else ""
        rows = np.flatnonzero(mask)
        for w in range(count):
            take = rng.choice(rows, size=min(WINDOW, len(rows)), replace=False)
            q = pooled[f"{prefix}q"][take]
            estimate = float(q.mean())
            half = 1.959964 * float(np.sqrt(np.sum(q * (1 - q)))) / len(q)
            realized = float(pooled[f"{prefix}correct"][take].mean())
            found.append(
                {
                    "scenario": name,
                    "window": w,
                    "rows": len(take),
                    "pool": len(rows),
                    "estimated": round(estimate, 4),
                    "band": [round(max(0.0, estimate - half), 4), round(min(1.0, estimate + half), 4)],
                    "realized": round(realized, 4),
                    "error": round(estimate - realized, 4),
                }
            )
    return found


def main(argv: list[str] | None = None) -> int:
    """Runs the validation and prints the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.cbpe", description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="default: the spec's (early stopping)")
    parser.add_argument("--windows", type=int, default=10, help="windows per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "cbpe.json")
    args = parser.parse_args(argv)
    pooled = out_of_fold(args.folds, args.epochs, args.seed)
    found = windows(pooled, args.windows, args.seed)
    header = ("scenario", "window", "pool", "estimated", "95% band", "realized", "error")
    print("\n{:16} {:>6} {:>5} {:>9} {:>15} {:>8} {:>7}".format(*header))
    for w in found:
        band = f"{w['band'][0]:.3f}-{w['band'][1]:.3f}"
        print(
            f"{w['scenario']:16} {w['window']:>6} {w['pool']:>5} {w['estimated']:>9.3f} {band:>15} "
            f"{w['realized']:>8.3f} {w['error']:>+7.3f}"
        )
    summary: dict[str, dict[str, float]] = {}
    print(f"\n{'scenario':16} {'mean est':>8} {'mean real':>9} {'max |error|':>11}")
    for name in scenarios(pooled):
        errs = [w for w in found if w["scenario"] == name]
        summary[name] = {
            "estimated": round(float(np.mean([w["estimated"] for w in errs])), 4),
            "realized": round(float(np.mean([w["realized"] for w in errs])), 4),
            "max_abs_error": round(float(max(abs(w["error"]) for w in errs)), 4),
        }
        s = summary[name]
        print(f"{name:16} {s['estimated']:>8.3f} {s['realized']:>9.3f} {s['max_abs_error']:>11.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"folds": args.folds, "summary": summary, "windows": found}, indent=1) + "\n"
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
