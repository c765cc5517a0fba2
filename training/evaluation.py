"""Test-split metrics for the model and for the baselines it has to beat."""

from __future__ import annotations

from typing import Any

import numpy as np

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


def baselines(
    task: TaskType,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """Scores a common-sense baseline and a shallow scikit-learn model on the test rows.

    The common-sense baseline predicts the majority class (classification) or the mean
    target (regression). The shallow model is a logistic regression or a ridge
    regression on standardised features. Both see the same train and test rows as
    the network.
    """
    from sklearn.dummy import DummyClassifier, DummyRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "regression":
        dummy = DummyRegressor(strategy="mean").fit(x_train, y_train)
        shallow = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x_train, y_train)
        return {
            "mean_predictor": score(task, y_test, dummy.predict(x_test)),
            "ridge": score(task, y_test, shallow.predict(x_test)),
        }
    dummy_clf = DummyClassifier(strategy="most_frequent").fit(x_train, y_train)
    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    logreg.fit(x_train, y_train)

    def proba(model: Any) -> np.ndarray:
        p = model.predict_proba(x_test)
        return p[:, 1:2] if task == "binary" else p

    return {
        "majority_class": score(task, y_test, proba(dummy_clf)),
        "logistic_regression": score(task, y_test, proba(logreg)),
    }
