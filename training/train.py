"""Training jobs: split, cross-validate, fit, evaluate against baselines, write a run.

A run directory holds ``model.keras``, ``metrics.json``, ``history.csv``,
``history.png``, ``tensorboard/``, ``baseline.json``, ``run.json`` (what the export
needs to know) and ``split.npz`` (the held-out rows, for the export parity check).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
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
    RUN_SPLIT_FILE,
)
from modelloop.training.baseline import build_baseline
from modelloop.training.data import kfold_indices, split_dataset
from modelloop.training.evaluation import baselines, higher_is_better, main_metric, score
from modelloop.training.spec import Dataset, SpecError, TaskSpec, check_dataset


@dataclass(frozen=True)
class RunResult:
    """What a finished training job produced."""

    run_dir: Path
    metrics: dict[str, Any]


def _compile(model: Any, spec: TaskSpec) -> None:
    import keras

    optimizer = keras.optimizers.Adam(learning_rate=float(spec.hp("learning_rate")))
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


def build_compiled_model(spec: TaskSpec, x_train: np.ndarray, y_train: np.ndarray) -> Any:
    """Builds the spec's model around a ``Normalization`` layer adapted on ``x_train``.

    Regression specs also receive ``target_mean`` and ``target_std`` of ``y_train`` in
    their hyperparameters, to rescale the output layer to target units.

    Raises:
        SpecError: The builder failed or returned something that is not a Keras model.
    """
    import keras

    normalizer = keras.layers.Normalization(axis=-1, name="normalization")
    normalizer.adapt(x_train)
    hparams: dict[str, Any] = {**_all_hparams(spec)}
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
    _compile(model, spec)
    return model


def _all_hparams(spec: TaskSpec) -> dict[str, Any]:
    from modelloop.training.spec import DEFAULT_HPARAMS

    return {**DEFAULT_HPARAMS, **spec.hparams}


def _cross_validate(
    spec: TaskSpec, x: np.ndarray, y: np.ndarray, *, folds: int, epochs: int, seed: int, verbose: int
) -> dict[str, Any]:
    import keras

    metric = main_metric(spec.task)
    scores: list[float] = []
    for k, (tr, va) in enumerate(
        kfold_indices(y, folds=folds, classification=spec.task != "regression", seed=seed)
    ):
        keras.utils.set_random_seed(seed + k)
        model = build_compiled_model(spec, x[tr], y[tr])
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=int(spec.hp("patience")), restore_best_weights=True
        )
        model.fit(
            x[tr],
            y[tr],
            validation_data=(x[va], y[va]),
            epochs=epochs,
            batch_size=int(spec.hp("batch_size")),
            callbacks=[stop],
            verbose=0,
        )
        fold_score = score(spec.task, y[va], model.predict(x[va], verbose=0))[metric]
        scores.append(fold_score)
        if verbose:
            print(f"fold {k + 1}/{folds} val_{metric}={fold_score:.4f}", flush=True)
        keras.backend.clear_session()
    return {
        "folds": folds,
        "metric": metric,
        "scores": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
    }


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
            rows is reported before the final fit. Defaults to 0 (none).
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

    kfold: dict[str, Any] | None = None
    if folds >= 2:
        fit_rows = np.concatenate([split.train, split.val])
        kfold = _cross_validate(
            spec, data.x[fit_rows], data.y[fit_rows], folds=folds, epochs=epochs, seed=seed, verbose=1
        )

    keras.utils.set_random_seed(seed)
    # Variables created inside a strategy's scope are mirrored and all-reduced.
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_compiled_model(spec, x_train, y_train)
    metric = main_metric(spec.task)
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
            batch_size=int(spec.hp("batch_size")),
            seed=seed,
            on_epoch_end=lambda e, logs: print(
                f"epoch {e + 1}/{epochs} loss={logs['loss']:.4f} val_loss={logs['val_loss']:.4f}", flush=True
            ),
        )
        # Predict, save and export on an undistributed copy of the trained weights.
        trained, model = model, build_compiled_model(spec, x_train, y_train)
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
            patience=int(spec.hp("patience")),
            epochs=epochs,
            interactive=interactive,
        )
        try:
            fit = model.fit(
                x_train,
                y_train,
                validation_data=(x_val, y_val),
                epochs=epochs,
                batch_size=int(spec.hp("batch_size")),
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
    base = baselines(spec.task, x_train, y_train, x_test, y_test, seed)
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
        "kfold": kfold,
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
    baseline = build_baseline(
        x_train=x_train,
        feature_names=data.feature_names,
        input_name=spec.input_name,
        task=spec.task,
        val_outputs=val_outputs,
        class_labels=data.class_labels,
        seed=seed,
        val_targets=y_val,
    )
    _write_json(out / RUN_METRICS_FILE, metrics)
    _write_json(out / RUN_INFO_FILE, run_info)
    _write_json(out / BASELINE_FILE, baseline)
    np.savez_compressed(out / RUN_SPLIT_FILE, x_test=x_test, y_test=y_test, x_val=x_val, y_val=y_val)
    _plot_history(history, metric, out / RUN_HISTORY_PLOT)
    return RunResult(run_dir=out, metrics=metrics)


def _tf_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
