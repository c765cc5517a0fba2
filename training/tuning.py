"""Hyperparameter search with KerasTuner, and the capacity check that comes before it.

The book's order: first show that the model can overfit (the capacity check: with dropout
and L2 off, the training metric on a small subset reaches near-perfect), then regularise
and tune on validation data. :func:`tune` runs KerasTuner's Bayesian optimisation over the
spec's ``SEARCH_SPACE`` (width, depth, dropout, L2, learning rate), scoring each trial by
the main metric on the validation split, or by its mean over K folds of the training and
validation rows. The budget is the number of trials (a third of them, at least two, drawn
at random before the Gaussian process proposes the rest); each trial fits at most the
run's epochs and stops early on the validation loss, as a training run does.

Example:

```python
result = tune(spec, x_train, y_train, x_val, y_val, trials=10, epochs=80, seed=42, directory=run / "tuning")
print(result.best_hparams, result.best_score)
```
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from modelloop.training.data import kfold_indices
from modelloop.training.evaluation import higher_is_better, main_metric, score
from modelloop.training.spec import Choice, IntRange, SearchDimension, TaskSpec

CAPACITY_ROWS = 64
"""Rows of the capacity check's subset."""
CAPACITY_EPOCHS = 300
"""Most epochs of the capacity check; it stops as soon as the target is reached."""
CAPACITY_LEARNING_RATE = 1e-2
"""Adam's rate in the capacity check: it asks whether the architecture can memorise a few
dozen rows, not whether the regularised run's (lower) rate gets there in a few hundred epochs."""
CAPACITY_ACCURACY = 0.99
"""Near-perfect for classifiers: training accuracy on the subset."""
CAPACITY_R2 = 0.95
"""Near-perfect for regressors: training R² on the subset."""

BuildModel = Callable[[TaskSpec, np.ndarray, np.ndarray, Mapping[str, Any]], Any]


@dataclass
class TuningResult:
    """What a search found.

    Attributes:
        objective: ``val_accuracy`` or ``val_mae`` (the mean over folds with K folds).
        direction: ``max`` or ``min``.
        best_hparams: The best trial's values of the searched hyperparameters.
        best_score: Its objective.
        trials: Every trial: its hyperparameters, score and status, in the order run.
        folds: K, or 0 when trials were scored on the validation split.
        seconds: Wall time of the search.
    """

    objective: str
    direction: str
    best_hparams: dict[str, Any]
    best_score: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    folds: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The ``"tuning"`` entry of ``metrics.json``."""
        return {
            "objective": self.objective,
            "direction": self.direction,
            "folds": self.folds,
            "trials_run": len(self.trials),
            "best": {"hparams": self.best_hparams, "score": self.best_score},
            "trials": self.trials,
            "seconds": round(self.seconds, 2),
        }


def _hp_value(hp: kt.HyperParameters, name: str, dim: SearchDimension) -> Any:
    if isinstance(dim, Choice):
        return hp.Choice(name, list(dim.values))
    if isinstance(dim, IntRange):
        return hp.Int(name, int(dim.low), int(dim.high))
    sampling = "log" if dim.log else "linear"
    return hp.Float(name, float(dim.low), float(dim.high), sampling=sampling)


def _fit_and_score(
    model: Any,
    spec: TaskSpec,
    hparams: Mapping[str, Any],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    epochs: int,
) -> float:
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=int(hparams["patience"]), restore_best_weights=True
    )
    model.fit(
        train[0],
        train[1],
        validation_data=val,
        epochs=epochs,
        batch_size=int(hparams["batch_size"]),
        callbacks=[stop],
        verbose=0,
    )
    return score(spec.task, val[1], model.predict(val[0], verbose=0))[main_metric(spec.task)]


class _SpecHyperModel(kt.HyperModel):  # type: ignore[misc]
    """A spec's builder with the searched hyperparameters merged over its own."""

    def __init__(
        self,
        spec: TaskSpec,
        build: BuildModel,
        base: Mapping[str, Any],
        train: tuple[np.ndarray, np.ndarray],
        val: tuple[np.ndarray, np.ndarray],
        *,
        folds: int,
        epochs: int,
        seed: int,
        objective: str,
        report: Callable[[dict[str, Any], float], None],
    ) -> None:
        super().__init__(name=f"{spec.name}-search")
        self._spec, self._builder, self._base = spec, build, dict(base)
        self._train, self._val = train, val
        self._folds, self._epochs, self._seed = folds, epochs, seed
        self._objective, self._report = objective, report

    def _hparams(self, hp: kt.HyperParameters) -> dict[str, Any]:
        searched = {name: _hp_value(hp, name, dim) for name, dim in self._spec.search_space.items()}
        return {**self._base, **searched}

    def build(self, hp: kt.HyperParameters) -> Any:
        keras.utils.set_random_seed(self._seed)
        return self._builder(self._spec, self._train[0], self._train[1], self._hparams(hp))

    def fit(self, hp: kt.HyperParameters, model: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        hparams = self._hparams(hp)
        if self._folds < 2:
            keras.utils.set_random_seed(self._seed)
            value = _fit_and_score(model, self._spec, hparams, self._train, self._val, self._epochs)
        else:
            # Each fold gets its own model, scaled on its own training rows.
            x = np.concatenate([self._train[0], self._val[0]])
            y = np.concatenate([self._train[1], self._val[1]])
            scores = []
            for k, (tr, va) in enumerate(
                kfold_indices(
                    y, folds=self._folds, classification=self._spec.task != "regression", seed=self._seed
                )
            ):
                keras.utils.set_random_seed(self._seed + k)
                fold_model = self._builder(self._spec, x[tr], y[tr], hparams)
                scores.append(
                    _fit_and_score(
                        fold_model, self._spec, hparams, (x[tr], y[tr]), (x[va], y[va]), self._epochs
                    )
                )
            value = float(np.mean(scores))
        self._report({k: hparams[k] for k in self._spec.search_space}, value)
        return {self._objective: value}


def tune(
    spec: TaskSpec,
    build: BuildModel,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    trials: int,
    epochs: int,
    seed: int,
    directory: Path,
    folds: int = 0,
    verbose: bool = True,
) -> TuningResult:
    """Searches the spec's space with KerasTuner's Bayesian optimisation.

    Args:
        spec: The task; its ``search_space`` must not be empty.
        build: ``build(spec, x_train, y_train, hparams)`` returns a compiled model whose
            scaling is fitted on ``x_train`` (the trainer's :func:`build_compiled_model`).
        train: Training rows and targets.
        val: Validation rows and targets.
        trials: The budget: how many trials to run.
        epochs: Most epochs of each fit; early stopping on the validation loss may stop
            it sooner.
        seed: Seed of the tuner and of each trial's weights.
        directory: Where KerasTuner keeps its trial records.
        folds: With ``K >= 2``, each trial is scored by its mean over K folds of the
            training and validation rows. Defaults to 0 (the validation split).
        verbose: Print one line per trial. Defaults to True.

    Returns:
        The best trial's hyperparameters and score, and every trial.
    """
    started = time.monotonic()
    metric = main_metric(spec.task)
    objective = f"val_{metric}"
    direction = "max" if higher_is_better(spec.task) else "min"
    trials_run: list[dict[str, Any]] = []

    def report(hparams: dict[str, Any], value: float) -> None:
        trials_run.append({"hparams": hparams, "score": value})
        if verbose:
            shown = " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items()
            )
            print(f"trial {len(trials_run)}/{trials} {objective}={value:.4f} {shown}", flush=True)

    base = {**spec_hparams(spec)}
    hypermodel = _SpecHyperModel(
        spec,
        build,
        base,
        train,
        val,
        folds=folds,
        epochs=epochs,
        seed=seed,
        objective=objective,
        report=report,
    )
    tuner = kt.BayesianOptimization(
        hypermodel,
        objective=kt.Objective(objective, direction=direction),
        max_trials=trials,
        # KerasTuner's default (3 random points per dimension, 15 here) would spend a budget
        # of 10 on random draws alone; a third of the budget leaves the rest to the model.
        num_initial_points=min(trials, max(2, trials // 3)),
        seed=seed,
        directory=str(directory),
        project_name=spec.name,
        overwrite=True,
    )
    with warnings.catch_warnings():
        # The oracle's Gaussian process is refitted on a handful of points each trial; its
        # length scale hitting a bound there is expected and says nothing actionable.
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        tuner.search(verbose=0)
    best = tuner.get_best_hyperparameters(1)[0]
    best_hparams = {name: best.get(name) for name in spec.search_space}
    best_trial = tuner.oracle.get_best_trials(1)[0]
    return TuningResult(
        objective=objective,
        direction=direction,
        best_hparams=best_hparams,
        best_score=float(best_trial.score),
        trials=trials_run,
        folds=folds if folds >= 2 else 0,
        seconds=time.monotonic() - started,
    )


def spec_hparams(spec: TaskSpec) -> dict[str, Any]:
    """The spec's hyperparameters merged over the defaults."""
    from modelloop.training.spec import DEFAULT_HPARAMS

    return {**DEFAULT_HPARAMS, **spec.hparams}


def check_capacity(
    spec: TaskSpec,
    build: BuildModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    rows: int = CAPACITY_ROWS,
    epochs: int = CAPACITY_EPOCHS,
) -> dict[str, Any]:
    """Fits the spec's model, dropout and L2 off, on a small subset until it is near-perfect.

    It trains with Adam at :data:`CAPACITY_LEARNING_RATE`, 16 rows a batch, checking every
    10 epochs.

    A model that cannot fit a few dozen rows cannot be rescued by regularisation or
    tuning; one that can is worth regularising. Near-perfect is training accuracy of at
    least :data:`CAPACITY_ACCURACY` (classifiers) or R² of at least :data:`CAPACITY_R2`
    (regressors), on the same subset it trained on.

    Args:
        spec: The task.
        build: As for :func:`tune`.
        x: Training rows to draw the subset from.
        y: Their targets.
        seed: Seed of the draw and the weights.
        rows: Size of the subset. Defaults to :data:`CAPACITY_ROWS`.
        epochs: Most epochs. Defaults to :data:`CAPACITY_EPOCHS`.

    Returns:
        ``{"rows", "epochs", "metric", "train", "target", "passed"}``.
    """
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(y), size=min(rows, len(y)), replace=False))
    xs, ys = x[take], y[take]
    hparams = {**spec_hparams(spec), "dropout": 0.0, "l2": 0.0, "learning_rate": CAPACITY_LEARNING_RATE}
    keras.utils.set_random_seed(seed)
    model = build(spec, xs, ys, hparams)
    classification = spec.task != "regression"
    metric, target = ("accuracy", CAPACITY_ACCURACY) if classification else ("r2", CAPACITY_R2)
    reached = {"epochs": 0}

    class _StopWhenFit(keras.callbacks.Callback):  # type: ignore[misc]
        """Stops at the first epoch whose training metric reaches the target (checked every 10)."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            reached["epochs"] = epoch + 1
            if (epoch + 1) % 10 == 0 and score(spec.task, ys, model.predict(xs, verbose=0))[metric] >= target:
                self.model.stop_training = True

    model.fit(xs, ys, epochs=epochs, batch_size=16, callbacks=[_StopWhenFit()], verbose=0)
    value = score(spec.task, ys, model.predict(xs, verbose=0))[metric]
    keras.backend.clear_session()
    return {
        "rows": len(ys),
        "epochs": reached["epochs"],
        "metric": metric,
        "train": value,
        "target": target,
        "passed": bool(value >= target),
    }
