"""Validation harness of the label-free estimate and every monitoring signal, beside NannyML's CBPE.

``python -m bench.estimation_harness [--folds 5] [--epochs 40] [--windows 20] [--no-nannyml]``
trains the built-in ``digits`` spec once per fold of a stratified K-fold split, through
the project's own training job (which fits and stores each run's calibrator), so every
digit is answered by a model that never saw it. The pooled out-of-fold rows then make
``--windows`` windows of 400 rows, drawn without replacement, per scenario:

- ``normal``: random rows;
- ``least confident 40 %``: the 40 % of rows whose top softmax probability is lowest;
- ``pixel noise sigma=2``: every pixel plus Gaussian noise (sigma 2, clipped to 0..16);
- ``class mix 3,5,8,9``: only the digits 3, 5, 8 and 9 (a change in the mix of classes);
- ``concept change``: the same inputs, but 1 and 7, and 3 and 8, now mean each other.
  Inputs and predictions do not move, so no label-free method can see it; only accuracy
  from labels does.

For each window it computes what the server computes (:mod:`modelloop.monitoring`): the
estimate and its 95 % band with each row's own run's calibrator, the share of drifted
features and prediction drift (:class:`~modelloop.monitoring.drift.DriftDetector` on the
first run's baseline), and the realized accuracy; and the verdict of each alert rule:
``ModelDriftDetected`` (share >= 0.5), ``ModelPredictionDrift`` (PSI >= 0.25),
``ModelEstimatedAccuracyBelowFloor`` and ``ModelAccuracyBelowFloor`` (under 0.8).

NannyML's CBPE (``nannyml==0.13.1``) runs on the same windows as a reference, from a
virtualenv the harness creates under the user's cache directory
(``$XDG_CACHE_HOME/modelloop/nannyml-0.13.1``), one estimator per run with that run's
validation split as reference; a window's estimate is the row-weighted mean of its
runs' chunks. If NannyML cannot be installed the harness says so and goes on.

It prints a table of every scenario and, with ``--out``, writes every window as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = 400
FLOOR = 0.8
NANNYML = "nannyml==0.13.1"
# nannyml 0.13.1 imports statsmodels (its plots) without requiring it.
NANNYML_EXTRA = "statsmodels"
NOISE_SIGMA = 2.0
CLASS_MIX = (3, 5, 8, 9)
# The concept change: these digits now mean each other.
SWAPS = ((1, 7), (3, 8))
SCENARIOS = (
    "normal",
    "least confident 40 %",
    "pixel noise sigma=2",
    "class mix 3,5,8,9",
    "concept change",
)


@dataclasses.dataclass
class Pooled:
    """Every digit, answered by the run that never saw it."""

    x: np.ndarray
    y: np.ndarray
    fold: np.ndarray
    outputs: np.ndarray
    noisy_x: np.ndarray
    noisy_outputs: np.ndarray
    baselines: list[dict[str, Any]]
    references: list[tuple[np.ndarray, np.ndarray]]


def out_of_fold(folds: int, epochs: int, seed: int) -> Pooled:
    """Trains one digits run per fold with the project's training job."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from sklearn.model_selection import StratifiedKFold

    from modelloop.training.spec import Dataset, load_spec
    from modelloop.training.train import train

    spec = load_spec("digits")
    data = spec.load_data()
    rng = np.random.default_rng(seed)
    noisy = np.clip(data.x + rng.normal(0.0, NOISE_SIGMA, data.x.shape), 0.0, 16.0).astype(np.float32)
    n = len(data.y)
    outputs = np.zeros((n, 10), np.float32)
    noisy_outputs = np.zeros((n, 10), np.float32)
    fold = np.zeros(n, np.int64)
    baselines: list[dict[str, Any]] = []
    references: list[tuple[np.ndarray, np.ndarray]] = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with tempfile.TemporaryDirectory(prefix="estimation-harness-") as tmp:
        for k, (fit_rows, held) in enumerate(splitter.split(data.x, data.y)):
            subset = Dataset(data.x[fit_rows], data.y[fit_rows], data.feature_names, data.class_labels)
            fold_spec = dataclasses.replace(spec, load_data=lambda subset=subset: subset)
            run = Path(tmp) / f"fold{k}"
            train(fold_spec, run, epochs=epochs, seed=seed + k, interactive=False)
            baseline = json.loads((run / "baseline.json").read_text())
            model = keras.models.load_model(run / "model.keras")
            outputs[held] = model.predict(data.x[held], verbose=0)
            noisy_outputs[held] = model.predict(noisy[held], verbose=0)
            split = np.load(run / "split.npz")
            references.append((np.asarray(model.predict(split["x_val"], verbose=0)), split["y_val"]))
            fold[held] = k
            baselines.append(baseline)
            cal = baseline.get("calibration", {})
            print(f"fold {k}: {len(fit_rows)} rows to train on, {len(held)} held out; {_describe(cal)}")
            keras.backend.clear_session()
    return Pooled(data.x, data.y, fold, outputs, noisy, noisy_outputs, baselines, references)


def _describe(calibration: dict[str, Any]) -> str:
    held = calibration.get("held_out")
    if held:
        return (
            f"calibrator {calibration['method']} on {calibration['rows']} rows of the "
            f"{calibration['fitted_on']} (held-out ECE {held['ece_before']:.4f} -> {held['ece_after']:.4f})"
        )
    method, rows, where = calibration.get("method"), calibration.get("rows"), calibration.get("fitted_on")
    return f"calibrator {method} on {rows} {where} rows"


def scenario_rows(pooled: Pooled) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per scenario: the rows to draw from, and the inputs, outputs and labels of every row."""
    confidence = pooled.outputs.max(axis=1)
    everything = np.arange(len(pooled.y))
    swapped = pooled.y.copy()
    for a, b in SWAPS:
        swapped[pooled.y == a], swapped[pooled.y == b] = b, a
    normal = (pooled.x, pooled.outputs, pooled.y)
    return {
        "normal": (everything, *normal),
        "least confident 40 %": (np.flatnonzero(confidence <= np.quantile(confidence, 0.40)), *normal),
        "pixel noise sigma=2": (everything, pooled.noisy_x, pooled.noisy_outputs, pooled.y),
        "class mix 3,5,8,9": (np.flatnonzero(np.isin(pooled.y, CLASS_MIX)), *normal),
        "concept change": (everything, pooled.x, pooled.outputs, swapped),
    }


def evaluate_windows(pooled: Pooled, count: int, seed: int) -> list[dict[str, Any]]:
    """Every window of every scenario, with the estimate, the band and each signal."""
    from modelloop.monitoring.drift import PREDICTION_DRIFT_THRESHOLD, DriftDetector
    from modelloop.monitoring.estimation import AccuracyEstimator, accuracy_band
    from modelloop.training.calibration import predicted_classes

    estimators = [AccuracyEstimator.from_baseline(b, task="multiclass") for b in pooled.baselines]
    detector = DriftDetector(pooled.baselines[0])
    rng = np.random.default_rng(seed)
    found: list[dict[str, Any]] = []
    for name, (rows, x, outputs, labels) in scenario_rows(pooled).items():
        for w in range(count):
            take = np.sort(rng.choice(rows, size=min(WINDOW, len(rows)), replace=False))
            predicted = predicted_classes(outputs[take])
            q = np.zeros(len(take))
            errors = np.zeros(len(take))
            for k, estimator in enumerate(estimators):
                mine = pooled.fold[take] == k
                if mine.any():
                    conf = estimator.confidences(outputs[take][mine])
                    assert conf is not None, "the run has no calibrator"
                    q[mine] = conf
                    errors[mine] = estimator.calibration_error
            estimate = float(q.mean())
            lower, upper = accuracy_band(q, float(errors.mean()))
            drift = detector.evaluate(x[take], predicted)
            realized = float(np.mean(predicted == labels[take]))
            found.append(
                {
                    "scenario": name,
                    "window": w,
                    "pool": len(rows),
                    "rows": len(take),
                    "take": take.tolist(),
                    "realized": realized,
                    "estimate": estimate,
                    "band": [lower, upper],
                    "drift_share": drift.share,
                    "prediction_psi": drift.prediction_psi,
                    "alerts": {
                        "ModelDriftDetected": drift.drifted,
                        "ModelPredictionDrift": (drift.prediction_psi or 0.0) >= PREDICTION_DRIFT_THRESHOLD,
                        "ModelEstimatedAccuracyBelowFloor": estimate < FLOOR,
                        "ModelAccuracyBelowFloor": realized < FLOOR,
                    },
                }
            )
    return found


def nannyml_python(cache: Path) -> Path | None:
    """The Python of a virtualenv with NannyML, created on first use; None if it cannot be."""
    venv = cache / "nannyml-0.13.1"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import nannyml"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing {NANNYML} into {venv} (once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", NANNYML, NANNYML_EXTRA],
            check=True,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        subprocess.run(check, check=True, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"NannyML could not be installed ({exc}); going on without it.\n{str(detail)[-2000:]}")
        return None
    return python


_NANNYML_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np, pandas as pd
    import nannyml as nml

    warnings.filterwarnings("ignore")
    data = np.load(sys.argv[1])
    folds = int(data["folds"])
    classes = list(range(data["ref_outputs_0"].shape[1]))
    columns = [f"p{c}" for c in classes]

    def frame(outputs, y=None):
        df = pd.DataFrame(outputs.astype("float64"), columns=columns)
        df["y_pred"] = outputs.argmax(axis=1)
        if y is not None:
            df["y_true"] = y.astype("int64")
        return df

    estimators = []
    for k in range(folds):
        cbpe = nml.CBPE(
            y_pred_proba=dict(zip(classes, columns)),
            y_pred="y_pred",
            y_true="y_true",
            problem_type="classification_multiclass",
            metrics=["accuracy"],
            chunk_number=1,
        )
        cbpe.fit(frame(data[f"ref_outputs_{k}"], data[f"ref_y_{k}"]))
        estimators.append(cbpe)
    window_of, fold_of, outputs = data["window"], data["fold"], data["outputs"]
    found = []
    for w in range(int(window_of.max()) + 1):
        value, variance, rows = 0.0, 0.0, int((window_of == w).sum())
        for k in range(folds):
            mine = (window_of == w) & (fold_of == k)
            if not mine.any():
                continue
            result = estimators[k].estimate(frame(outputs[mine])).filter(period="analysis").to_df()
            share = mine.sum() / rows
            value += share * float(result[("accuracy", "value")].iloc[0])
            variance += share**2 * float(result[("accuracy", "sampling_error")].iloc[0]) ** 2
        found.append({"estimate": value, "sampling_error": variance**0.5})
    json.dump(found, sys.stdout)
    """
)


def run_nannyml(python: Path, pooled: Pooled, windows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """NannyML's CBPE estimate and sampling error of every window, or None if it fails."""
    scenarios = scenario_rows(pooled)
    window_ids, folds, outputs = [], [], []
    for i, w in enumerate(windows):
        take = np.asarray(w["take"])
        window_ids.append(np.full(len(take), i))
        folds.append(pooled.fold[take])
        outputs.append(scenarios[w["scenario"]][2][take])
    arrays: dict[str, Any] = {
        "folds": np.asarray(len(pooled.references)),
        "window": np.concatenate(window_ids),
        "fold": np.concatenate(folds),
        "outputs": np.concatenate(outputs),
    }
    for k, (ref_outputs, ref_y) in enumerate(pooled.references):
        arrays[f"ref_outputs_{k}"] = ref_outputs
        arrays[f"ref_y_{k}"] = ref_y
    with tempfile.TemporaryDirectory(prefix="estimation-nannyml-") as tmp:
        path = Path(tmp) / "windows.npz"
        np.savez(path, **arrays)
        script = Path(tmp) / "cbpe.py"
        script.write_text(_NANNYML_SCRIPT)
        result = subprocess.run([str(python), str(script), str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"NannyML's CBPE failed; going on without it:\n{result.stderr[-3000:]}")
        return None
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def summarise(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per scenario: accuracy, estimate, errors, coverage and alert counts."""
    lines = []
    for name in SCENARIOS:
        mine = [w for w in windows if w["scenario"] == name]
        errors = np.array([w["estimate"] - w["realized"] for w in mine])
        inside = sum(w["band"][0] <= w["realized"] <= w["band"][1] for w in mine)
        line: dict[str, Any] = {
            "scenario": name,
            "windows": len(mine),
            "pool": mine[0]["pool"],
            "realized": float(np.mean([w["realized"] for w in mine])),
            "estimate": float(np.mean([w["estimate"] for w in mine])),
            "mae": float(np.abs(errors).mean()),
            "max": float(np.abs(errors).max()),
            "coverage": inside,
            "half_band": float(np.mean([(w["band"][1] - w["band"][0]) / 2 for w in mine])),
            "drift_share": float(np.mean([w["drift_share"] for w in mine])),
            "prediction_psi": float(np.mean([w["prediction_psi"] for w in mine])),
            "alerts": {a: sum(w["alerts"][a] for w in mine) for a in mine[0]["alerts"]},
        }
        if "nannyml" in mine[0]:
            nml_errors = np.array([w["nannyml"]["estimate"] - w["realized"] for w in mine])
            line["nannyml_mae"] = float(np.abs(nml_errors).mean())
            line["nannyml_max"] = float(np.abs(nml_errors).max())
            line["nannyml_coverage"] = sum(
                abs(w["nannyml"]["estimate"] - w["realized"]) <= 1.959964 * w["nannyml"]["sampling_error"]
                for w in mine
            )
        lines.append(line)
    return lines


def print_table(lines: list[dict[str, Any]]) -> None:
    """The summary as a Markdown table."""
    print(
        "\n| scenario | realized | estimate | MAE (max) | in 95 % band (± mean) "
        "| NannyML MAE (max) | NannyML in band "
        "| drift share | ModelDriftDetected | prediction PSI | ModelPredictionDrift "
        "| EstimatedAccuracyBelowFloor | AccuracyBelowFloor |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for s in lines:
        n = s["windows"]
        nml = (
            f"{s['nannyml_mae']:.4f} ({s['nannyml_max']:.4f}) | {s['nannyml_coverage']}/{n}"
            if "nannyml_mae" in s
            else "n/a | n/a"
        )
        a = s["alerts"]
        print(
            f"| {s['scenario']} | {s['realized']:.3f} | {s['estimate']:.3f} "
            f"| {s['mae']:.4f} ({s['max']:.4f}) "
            f"| {s['coverage']}/{n} (±{s['half_band']:.3f}) | {nml} "
            f"| {s['drift_share']:.2f} | {a['ModelDriftDetected']}/{n} "
            f"| {s['prediction_psi']:.2f} | {a['ModelPredictionDrift']}/{n} "
            f"| {a['ModelEstimatedAccuracyBelowFloor']}/{n} | {a['ModelAccuracyBelowFloor']}/{n} |"
        )


def main(argv: list[str] | None = None) -> int:
    """Runs the harness and prints the table."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.estimation_harness", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--folds", type=int, default=5, help="runs, one per fold (default 5)")
    parser.add_argument("--epochs", type=int, default=40, help="most epochs per run (default 40)")
    parser.add_argument("--windows", type=int, default=20, help="windows per scenario (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-nannyml", action="store_true", help="skip the NannyML reference")
    parser.add_argument("--out", type=Path, default=None, help="write every window here as JSON")
    args = parser.parse_args(argv)
    pooled = out_of_fold(args.folds, args.epochs, args.seed)
    windows = evaluate_windows(pooled, args.windows, args.seed)
    if args.no_nannyml:
        print("NannyML skipped (--no-nannyml).")
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelloop"
        python = nannyml_python(cache)
        nml = run_nannyml(python, pooled, windows) if python is not None else None
        if nml is not None:
            for w, n in zip(windows, nml, strict=True):
                w["nannyml"] = n
    lines = summarise(windows)
    print_table(lines)
    if args.out is not None:
        for w in windows:
            del w["take"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        calibrators = [b.get("calibration") for b in pooled.baselines]
        payload = {"calibrators": calibrators, "summary": lines, "windows": windows}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
