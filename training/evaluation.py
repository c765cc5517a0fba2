"""Test-split metrics for the model and for the baselines it has to beat."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.training.preprocessing import InputScaling
from modelloop.training.spec import TaskType


def main_metric(task: TaskType) -> str:
    """The metric a task is judged by: ``accuracy`` or ``mae``."""
    return "mae" if task == "regression" else "accuracy"


def higher_is_better(task: TaskType) -> bool:
    """Whether a larger value of :func:`main_metric` is better."""
    return task != "regression"


def predict_labels(task: TaskType, outputs: np.ndarray) -> np.ndarray:
    """Turns model outputs into class ids (classification) or values (regression)."""
    if task == "multiclass":
        return outputs.argmax(axis=1)
    if task == "binary":
        return (outputs.reshape(-1) >= 0.5).astype(np.int64)
    return outputs.reshape(-1)


def score(task: TaskType, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """Computes the task's metrics from raw model outputs.

    Args:
        task: The task type.
        y_true: True class ids or values.
        outputs: Probabilities (``[n, k]`` multiclass, ``[n, 1]`` binary) or values.

    Returns:
        ``accuracy`` (and ``auc`` for binary) for classifiers; ``mae``, ``rmse`` and
        ``r2`` for regressors.
    """
    from sklearn import metrics

    pred = predict_labels(task, outputs)
    if task == "regression":
        return {
            "mae": float(metrics.mean_absolute_error(y_true, pred)),
            "rmse": float(np.sqrt(metrics.mean_squared_error(y_true, pred))),
            "r2": float(metrics.r2_score(y_true, pred)),
        }
    result = {"accuracy": float(metrics.accuracy_score(y_true, pred))}
    if task == "binary":
        result["auc"] = float(metrics.roc_auc_score(y_true, outputs.reshape(-1)))
    return result


@dataclass(frozen=True)
class ShallowModel:
    """A fitted baseline, ready to score any raw rows.

    Attributes:
        name: ``majority_class``, ``logistic_regression``, ``hist_gradient_boosting``,
            ``svc_rbf`` (classifiers) or ``mean_predictor``, ``ridge``,
            ``hist_gradient_boosting``, ``svr_rbf`` (regressors).
        predict: Raw rows -> outputs shaped like the network's (probabilities ``[n, k]``,
            ``[n, 1]`` for binary, or values).
        common_sense: Whether it is the common-sense baseline (majority class or mean),
            which never counts as the strongest shallow model.
    """

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    common_sense: bool = False


def fit_baselines(
    task: TaskType, x_train: np.ndarray, y_train: np.ndarray, scaling: InputScaling, seed: int
) -> dict[str, ShallowModel]:
    """Fits the common-sense baseline and three shallow scikit-learn models on the training rows.

    The common-sense baseline predicts the majority class (classification) or the mean target
    (regression). The shallow models, with scikit-learn's defaults: logistic or ridge
    regression and an RBF SVC (Platt-calibrated; SVR on standardised targets for regression) on the same
    scaled features as the network, and HistGradientBoosting on the raw features (trees do
    not care about scale).

    Args:
        task: The task type.
        x_train: Raw training features, the network's training rows.
        y_train: Their targets.
        scaling: The network's input scaling, applied to the linear and kernel models.
        seed: Seed of the models that draw random numbers.

    Returns:
        Name -> fitted model, the common-sense baseline first.
    """
    with _one_thread():
        return _fit_baselines(task, x_train, y_train, scaling, seed)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Runs scikit-learn on one OpenMP and BLAS thread.

    On a few thousand rows threads gain nothing, and their spinning workers can starve
    against TensorFlow's own pools: in a two-worker ``--distributed`` run on two cores,
    HistGradientBoosting's fit went from seconds to minutes.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _fit_baselines(
    task: TaskType, x_train: np.ndarray, y_train: np.ndarray, scaling: InputScaling, seed: int
) -> dict[str, ShallowModel]:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.dummy import DummyClassifier, DummyRegressor
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    xs = scaling.transform(x_train)
    if task == "regression":
        dummy = DummyRegressor(strategy="mean").fit(x_train, y_train)
        ridge = Ridge(alpha=1.0).fit(xs, y_train)
        boost = HistGradientBoostingRegressor(random_state=seed).fit(x_train, y_train)
        svr = TransformedTargetRegressor(regressor=SVR(kernel="rbf"), transformer=StandardScaler())
        svr.fit(xs, y_train)

        def values(model: Any, scaled: bool) -> Callable[[np.ndarray], np.ndarray]:
            def predict(x: np.ndarray) -> np.ndarray:
                with _one_thread():
                    return np.asarray(model.predict(scaling.transform(x) if scaled else x)).reshape(-1, 1)

            return predict

        return {
            "mean_predictor": ShallowModel("mean_predictor", values(dummy, False), common_sense=True),
            "ridge": ShallowModel("ridge", values(ridge, True)),
            "hist_gradient_boosting": ShallowModel("hist_gradient_boosting", values(boost, False)),
            "svr_rbf": ShallowModel("svr_rbf", values(svr, True)),
        }
    majority = DummyClassifier(strategy="most_frequent").fit(x_train, y_train)
    logreg = LogisticRegression(max_iter=2000, random_state=seed).fit(xs, y_train)
    boost_clf = HistGradientBoostingClassifier(random_state=seed).fit(x_train, y_train)
    # Platt-scaled probabilities from cross-validated decision values (SVC's own
    # probability=True is deprecated in favour of this).
    svc = CalibratedClassifierCV(SVC(kernel="rbf"), ensemble=False).fit(xs, y_train)

    def proba(model: Any, scaled: bool) -> Callable[[np.ndarray], np.ndarray]:
        def predict(x: np.ndarray) -> np.ndarray:
            with _one_thread():
                p = np.asarray(model.predict_proba(scaling.transform(x) if scaled else x))
            return p[:, 1:2] if task == "binary" else p

        return predict

    return {
        "majority_class": ShallowModel("majority_class", proba(majority, False), common_sense=True),
        "logistic_regression": ShallowModel("logistic_regression", proba(logreg, True)),
        "hist_gradient_boosting": ShallowModel("hist_gradient_boosting", proba(boost_clf, False)),
        "svc_rbf": ShallowModel("svc_rbf", proba(svc, True)),
    }


def strongest_baseline(task: TaskType, models: Mapping[str, ShallowModel], scores: Mapping[str, Any]) -> str:
    """The shallow (not common-sense) baseline with the best main metric; ties keep the first.

    Args:
        task: The task type.
        models: The fitted baselines.
        scores: Name -> metrics on the rows that decide (the test split).

    Returns:
        The name.
    """
    metric = main_metric(task)
    sign = 1.0 if higher_is_better(task) else -1.0
    shallow = [name for name, model in models.items() if not model.common_sense]
    return max(shallow, key=lambda name: sign * float(scores[name][metric]))
