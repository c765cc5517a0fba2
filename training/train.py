"""Training jobs: split, cross-validate, fit, evaluate against baselines, write a run.

A run directory holds ``model.keras``, ``metrics.json``, ``history.csv``,
``history.png`` (learning curves), ``robustness.png`` (test metric against input noise,
for the model and the baselines), ``tensorboard/``, ``baseline.json``, ``run.json`` (what
the export needs to know), ``split.npz`` (the held-out rows, for the export parity check)
and, with ``--tune``, ``tuning/`` (KerasTuner's trial records).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.errors import ModelloopError
from modelloop.layout import (
    BASELINE_FILE,
    RUN_HISTORY_PLOT,
    RUN_INFO_FILE,
    RUN_METRICS_FILE,
    RUN_MODEL_FILE,
    RUN_ROBUSTNESS_PLOT,
    RUN_SPLIT_FILE,
    RUN_TUNING_DIR,
)
from modelloop.training.baseline import build_baseline
from modelloop.training.data import kfold_indices, split_dataset
from modelloop.training.evaluation import (
    ShallowModel,
    fit_baselines,
    higher_is_better,
    main_metric,
    score,
    strongest_baseline,
)
from modelloop.training.preprocessing import InputScaling, fit_scaling
from modelloop.training.robustness import NOISE_LEVELS, perturbation_suite, plot_robustness, robustness_report
from modelloop.training.spec import Dataset, SpecError, TaskSpec, check_dataset


@dataclass(frozen=True)
class RunResult:
    """What a finished training job produced.

    Attributes:
        run_dir: The run directory.
        metrics: What ``metrics.json`` holds.
        baselines: The fitted baselines, by name (in memory only), so a caller such as
            the retrain gate can score them on rows of its own.
    """

    run_dir: Path
    metrics: dict[str, Any]
    baselines: dict[str, ShallowModel] = field(default_factory=dict)


def _compile(model: Any, spec: TaskSpec, learning_rate: float) -> None:
    import keras

    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if spec.task == "multiclass":
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    elif spec.task == "binary":
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        )
    else:
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.MeanSquaredError(),
            metrics=[keras.metrics.MeanAbsoluteError(name="mae")],
        )


def build_compiled_model(
    spec: TaskSpec, x_train: np.ndarray, y_train: np.ndarray, hparams: Mapping[str, Any] | None = None
) -> Any:
    """Builds the spec's model around a ``Normalization`` layer fitted on ``x_train``.

    The layer's scaling is :func:`~modelloop.training.preprocessing.fit_scaling`'s: a
    standardisation floored for (near-)constant features, or the spec's pixel range.
    Regression specs also receive ``target_mean`` and ``target_std`` of ``y_train`` in
    their hyperparameters, to rescale the output layer to target units.

    Args:
        spec: The task.
        x_train: Raw training features.
        y_train: Their targets.
        hparams: Hyperparameters to use instead of the spec's (a tuning trial's).
            Defaults to the spec's merged over the defaults.

    Raises:
        SpecError: The builder failed or returned something that is not a Keras model.
    """
    import keras

    normalizer = fit_scaling(x_train, spec.pixel_range).layer()
    hparams = {**_all_hparams(spec), **(hparams or {})}
    if spec.task == "regression":
        hparams["target_mean"] = float(np.mean(y_train))
        hparams["target_std"] = float(np.std(y_train)) or 1.0
    try:
        model = spec.build_model(normalizer, hparams)
    except Exception as exc:
        raise SpecError(f"spec {spec.source!r}: build_model failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, keras.Model):
        raise SpecError(
            f"spec {spec.source!r}: build_model must return a keras.Model, got {type(model).__name__}"
        )
    _compile(model, spec, float(hparams["learning_rate"]))
    return model


def _all_hparams(spec: TaskSpec) -> dict[str, Any]:
    from modelloop.training.spec import DEFAULT_HPARAMS

    return {**DEFAULT_HPARAMS, **spec.hparams}


def _cross_validate(
    spec: TaskSpec,
    x: np.ndarray,
    y: np.ndarray,
    *,
    folds: int,
    epochs: int,
    seed: int,
    verbose: int,
    hparams: Mapping[str, Any],
) -> tuple[dict[str, Any], np.ndarray]:
    """K-fold scores and the out-of-fold outputs.

    Early stopping watches a part of each fold's training rows, never the fold it is
    scored on, so the score and the out-of-fold outputs come from rows that neither the
    weights nor early stopping saw (the calibrator is fitted on them).
    """
    import keras
    from sklearn.model_selection import train_test_split

    metric = main_metric(spec.task)
    scores: list[float] = []
    outputs: np.ndarray | None = None
    classification = spec.task != "regression"
    for k, (tr, va) in enumerate(kfold_indices(y, folds=folds, classification=classification, seed=seed)):
        keras.utils.set_random_seed(seed + k)
        strat = y[tr] if classification and np.bincount(y[tr].astype(np.int64)).min() >= 2 else None
        fit, stop_rows = train_test_split(tr, test_size=0.15, random_state=seed + k, stratify=strat)
        model = build_compiled_model(spec, x[fit], y[fit], hparams)
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=int(hparams["patience"]), restore_best_weights=True
        )
        model.fit(
            x[fit],
            y[fit],
            validation_data=(x[stop_rows], y[stop_rows]),
            epochs=epochs,
            batch_size=int(hparams["batch_size"]),
            callbacks=[stop],
            verbose=0,
        )
        fold_outputs = np.asarray(model.predict(x[va], verbose=0))
        if outputs is None:
            outputs = np.zeros((len(y), *fold_outputs.shape[1:]), dtype=np.float32)
        outputs[va] = fold_outputs
        fold_score = score(spec.task, y[va], fold_outputs)[metric]
        scores.append(fold_score)
        if verbose:
            print(f"fold {k + 1}/{folds} val_{metric}={fold_score:.4f}", flush=True)
        keras.backend.clear_session()
    report = {
        "folds": folds,
        "metric": metric,
        "scores": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
    }
    if outputs is None:
        raise ModelloopError(f"--folds must be at least 2, got {folds}")
    return report, outputs


def _plot_history(history: Mapping[str, list[float]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", metric), strict=True):
        epochs = range(1, len(history.get(key, [])) + 1)
        ax.plot(epochs, history.get(key, []), label=f"training {key}")
        ax.plot(epochs, history.get(f"val_{key}", []), label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ModelloopError(f"run directory {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ModelloopError(f"run directory {str(out)!r} is not empty; choose a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelloopError(f"cannot create run directory {str(out)!r}: {exc.strerror}") from exc


def train(
    spec: TaskSpec,
    out: Path,
    *,
    epochs: int | None = None,
    seed: int = 42,
    folds: int = 0,
    tune: int = 0,
    extra: Dataset | None = None,
    interactive: bool | None = None,
    strategy: Any | None = None,
) -> RunResult:
    """Runs a training job and writes its run directory.

    Args:
        spec: The task to learn.
        out: The run directory to create; it must not exist or be empty.
        epochs: Most epochs to fit; EarlyStopping may stop sooner. Defaults to the
            spec's ``epochs`` hyperparameter.
        seed: Seed of the split, the weights and the shuffles. Defaults to 42.
        folds: With ``K >= 2``, K-fold cross-validation on the train and validation
            rows is reported before the final fit (and, with ``tune``, each trial is
            scored on the K folds). Defaults to 0 (none).
        tune: With ``N >= 1``, a capacity check and then a KerasTuner search of N trials
            over the spec's ``SEARCH_SPACE`` run first, and the final model is trained
            with the best trial's hyperparameters. Defaults to 0 (the spec's own).
        extra: Additional labelled rows (feedback) appended to the training part.
        interactive: Keras progress bar (True) or one line per epoch (False).
            Defaults to whether standard output is a terminal.
        strategy: A ``tf.distribute`` strategy (``MultiWorkerMirroredStrategy`` for
            ``--distributed``, see :mod:`modelloop.training.distributed`) whose scope
            owns the model's variables. Defaults to None (one device).

    Returns:
        The run directory and the metrics written to ``metrics.json``.

    Raises:
        ModelloopError: Bad arguments, a bad spec or an unusable run directory.
    """
    if epochs is not None and epochs < 1:
        raise ModelloopError(f"--epochs must be at least 1, got {epochs}")
    if folds == 1 or folds < 0:
        raise ModelloopError(f"--folds must be 0 (off) or at least 2, got {folds}")
    if tune < 0:
        raise ModelloopError(f"--tune must be at least 1 trial, got {tune}")
    if tune and not spec.search_space:
        raise ModelloopError(f"spec {spec.name!r} declares no SEARCH_SPACE, so --tune has nothing to search")
    if tune and strategy is not None:
        raise ModelloopError("--tune cannot be combined with --distributed")
    try:
        data = check_dataset(spec.load_data(), spec)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"spec {spec.source!r}: load_data failed: {type(exc).__name__}: {exc}") from exc
    _prepare_out(out)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from modelloop.training.callbacks import standard_callbacks

    started = time.monotonic()
    epochs = int(epochs if epochs is not None else spec.hp("epochs"))
    interactive = sys.stdout.isatty() if interactive is None else interactive
    verbose = 1 if interactive else 0
    classification = spec.task != "regression"
    split = split_dataset(data, classification=classification, seed=seed)
    x_train, y_train = data.x[split.train], data.y[split.train]
    if extra is not None and len(extra.y):
        x_train = np.concatenate([x_train, np.asarray(extra.x, dtype=np.float32)])
        y_train = np.concatenate([y_train, np.asarray(extra.y, dtype=y_train.dtype)])
    x_val, y_val = data.x[split.val], data.y[split.val]
    x_test, y_test = data.x[split.test], data.y[split.test]

    hparams = _all_hparams(spec)
    tuning: dict[str, Any] | None = None
    capacity: dict[str, Any] | None = None
    if tune:
        from modelloop.training.tuning import check_capacity
        from modelloop.training.tuning import tune as run_search

        capacity = check_capacity(spec, build_compiled_model, x_train, y_train, seed=seed)
        print(
            f"capacity check: training {capacity['metric']} {capacity['train']:.4f} "
            f"on {capacity['rows']} rows after {capacity['epochs']} epochs without dropout or L2 "
            f"({'passed' if capacity['passed'] else 'NOT reached'}: target {capacity['target']})",
            flush=True,
        )
        search = run_search(
            spec,
            build_compiled_model,
            (x_train, y_train),
            (x_val, y_val),
            trials=tune,
            epochs=epochs,
            seed=seed,
            directory=out / RUN_TUNING_DIR,
            folds=folds,
        )
        tuning = search.to_dict()
        hparams = {**hparams, **search.best_hparams}
        print(f"best trial: {search.objective}={search.best_score:.4f} {search.best_hparams}", flush=True)

    kfold: dict[str, Any] | None = None
    # The calibrator's rows: the test split, which neither the weights nor early stopping
    # saw, or with K folds every train and validation row, each answered by the fold
    # model that did not see it (more rows, more errors to learn from).
    fit_rows = np.concatenate([split.train, split.val])
    oof_outputs: np.ndarray | None = None
    if folds >= 2:
        kfold, oof_outputs = _cross_validate(
            spec,
            data.x[fit_rows],
            data.y[fit_rows],
            folds=folds,
            epochs=epochs,
            seed=seed,
            verbose=1,
            hparams=hparams,
        )

    keras.utils.set_random_seed(seed)
    # Variables created inside a strategy's scope are mirrored and all-reduced.
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_compiled_model(spec, x_train, y_train, hparams)
    metric = main_metric(spec.task)
    batch_size = int(hparams["batch_size"])
    if strategy is not None:
        from modelloop.training.distributed import fit_distributed

        history = fit_distributed(
            model,
            strategy,
            x_train,
            y_train,
            x_val,
            y_val,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            on_epoch_end=lambda e, logs: print(
                f"epoch {e + 1}/{epochs} loss={logs['loss']:.4f} val_loss={logs['val_loss']:.4f}", flush=True
            ),
        )
        # Predict, save and export on an undistributed copy of the trained weights.
        trained, model = model, build_compiled_model(spec, x_train, y_train, hparams)
        model.set_weights(trained.get_weights())
        # The optimizer state too, so model.keras loads without a "skipping variables" warning.
        model.optimizer.build(model.trainable_variables)
        for target, source in zip(model.optimizer.variables, trained.optimizer.variables, strict=True):
            target.assign(source.numpy())
    else:
        callbacks = standard_callbacks(
            out,
            monitor="val_loss",
            mode="min",
            patience=int(hparams["patience"]),
            epochs=epochs,
            interactive=interactive,
        )
        try:
            fit = model.fit(
                x_train,
                y_train,
                validation_data=(x_val, y_val),
                epochs=epochs,
                batch_size=batch_size,
                callbacks=callbacks,
                verbose=verbose,
            )
        except BaseException:
            # Keras skips on_train_end when fit raises, so CSVLogger would leak its open file.
            for callback in callbacks:
                if isinstance(callback, keras.callbacks.CSVLogger) and callback.csv_file is not None:
                    callback.csv_file.close()
            raise
        history = fit.history
    val_loss = history["val_loss"]
    best_epoch = int(np.argmin(val_loss)) + 1

    test_outputs = model.predict(x_test, verbose=0)
    val_outputs = model.predict(x_val, verbose=0)
    test_metrics = score(spec.task, y_test, test_outputs)
    scaling = fit_scaling(x_train, spec.pixel_range)
    shallow = fit_baselines(spec.task, x_train, y_train, scaling, seed)
    base = {name: score(spec.task, y_test, b.predict(x_test)) for name, b in shallow.items()}
    strongest = strongest_baseline(spec.task, shallow, base)
    robustness = _robustness(spec, model, shallow, scaling, data.feature_names, x_test, y_test, seed)
    model.save(out / RUN_MODEL_FILE)

    run_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
    metrics: dict[str, Any] = {
        "run_id": run_id,
        "spec": spec.name,
        "task": spec.task,
        "main_metric": metric,
        "higher_is_better": higher_is_better(spec.task),
        "test": test_metrics,
        "validation": score(spec.task, y_val, val_outputs),
        "baselines": base,
        "strongest_baseline": strongest,
        "robustness": robustness,
        "kfold": kfold,
        "tuning": tuning,
        "capacity": capacity,
        "hparams": {k: hparams[k] for k in sorted(hparams)},
        "best_epoch": best_epoch,
        "epochs_run": len(val_loss),
        "epochs_max": epochs,
        "rows": {"train": len(y_train), "validation": len(y_val), "test": len(y_test)},
        "feedback_rows": 0 if extra is None else len(extra.y),
        "seed": seed,
        "train_seconds": round(time.monotonic() - started, 2),
    }
    run_info = {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "spec": {"name": spec.name, "source": spec.source, "task": spec.task},
        "input": {"name": spec.input_name, "dtype": "float32", "shape": [-1, data.x.shape[1]]},
        "output": {"name": spec.output_name, "dtype": "float32", "shape": [-1, int(test_outputs.shape[1])]},
        "feature_names": data.feature_names,
        "class_labels": data.class_labels,
        "seed": seed,
        "versions": {"keras": keras.__version__, "tensorflow": _tf_version()},
    }
    if spec.python_model is not None:
        # The export ships the spec's model.py around the network (see training.spec.PythonModel).
        run_info["runtime"] = "python"
    baseline = build_baseline(
        x_train=x_train,
        feature_names=data.feature_names,
        input_name=spec.input_name,
        task=spec.task,
        val_outputs=val_outputs,
        class_labels=data.class_labels,
        seed=seed,
        calibration_outputs=test_outputs if oof_outputs is None else oof_outputs,
        calibration_targets=y_test if oof_outputs is None else data.y[fit_rows],
        calibration_rows="test split" if oof_outputs is None else f"out-of-fold ({folds} folds)",
    )
    baseline["scaling"] = scaling.describe(data.feature_names)
    floored = set(baseline["scaling"]["floored"])
    for feature in baseline["features"]:
        feature["floored"] = feature["name"] in floored
    _write_json(out / RUN_METRICS_FILE, metrics)
    _write_json(out / RUN_INFO_FILE, run_info)
    _write_json(out / BASELINE_FILE, baseline)
    np.savez_compressed(out / RUN_SPLIT_FILE, x_test=x_test, y_test=y_test, x_val=x_val, y_val=y_val)
    _plot_history(history, metric, out / RUN_HISTORY_PLOT)
    plot_robustness(
        robustness["curve"], out / RUN_ROBUSTNESS_PLOT, title=f"{spec.name}: test metric against noise"
    )
    return RunResult(run_dir=out, metrics=metrics, baselines=shallow)


def _robustness(
    spec: TaskSpec,
    model: Any,
    shallow: dict[str, ShallowModel],
    scaling: InputScaling,
    feature_names: list[str],
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """The model's and every baseline's test metrics on the same perturbed test rows."""
    suite = perturbation_suite(x_test, scaling, feature_names, image=spec.pixel_range is not None, seed=seed)
    predictors: dict[str, Any] = {"model": lambda x: model.predict(x, verbose=0)}
    predictors |= {name: b.predict for name, b in shallow.items()}
    report = robustness_report(spec.task, y_test, suite, predictors)
    return {
        "noise_levels": list(NOISE_LEVELS),
        "perturbations": report["perturbations"],
        "model": report["scores"]["model"],
        "baselines": {name: report["scores"][name] for name in shallow},
        "curve": report["curve"],
    }


def _tf_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
