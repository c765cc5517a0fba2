"""The label-free estimate tracks realized accuracy on covariate shifts, and fails on a concept change.

Every digit is answered by a model that never saw it: a 5-fold cross-fit of a small
scikit-learn MLP (seconds, where the Keras job takes minutes per fold), each fold's
calibrator fitted by :func:`~modelloop.training.calibration.fit_calibration` on a 15 %
split of its training rows that the fit never saw (the training job uses its test split,
for the same reason), and applied by the server's
:class:`~modelloop.monitoring.estimation.AccuracyEstimator`. Windows of 500 rows are drawn
without replacement from shifts that select rows on their inputs only. The same validation
through the project's own Keras training job is ``python -m bench.cbpe``; the scenarios of
``python -m bench.estimation_harness``, beside NannyML, have their figures in
docs/monitoring.md.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from modelloop.monitoring.estimation import AccuracyEstimator
from modelloop.monitoring.simulate import drift_digits
from modelloop.training.calibration import fit_calibration

pytestmark = pytest.mark.slow

WINDOW = 500
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def out_of_fold() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    inverted = drift_digits(x, np.random.default_rng(0))
    n = len(y)
    found = {k: np.zeros(n) for k in ("q", "correct", "confidence", "inverted_q", "inverted_correct")}
    for k, (fit, held) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y)):
        train, val = train_test_split(fit, test_size=0.15, random_state=k, stratify=y[fit])
        model = make_pipeline(
            StandardScaler(), MLPClassifier((64,), alpha=1e-2, max_iter=300, random_state=k)
        )
        with warnings.catch_warnings():
            # A fixed iteration budget keeps the test short; an unconverged fit is still a model.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x[train], y[train])
        estimator = AccuracyEstimator(
            fit_calibration(model.predict_proba(x[val]), y[val], task="multiclass", seed=k), "multiclass"
        )
        for prefix, rows in (("", x[held]), ("inverted_", inverted[held])):
            outputs = model.predict_proba(rows)
            found[f"{prefix}q"][held] = estimator.confidences(outputs)
            found[f"{prefix}correct"][held] = outputs.argmax(axis=1) == y[held]
        found["confidence"][held] = model.predict_proba(x[held]).max(axis=1)
    found["ink"] = x.sum(axis=1)
    return found


def _windows(rows: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(rows, size=min(WINDOW, len(rows)), replace=False) for _ in range(count)]


@pytest.mark.parametrize("scenario", ["no shift", "little ink", "much ink", "least sure"])
def test_the_estimate_tracks_accuracy_on_covariate_shifts(
    out_of_fold: dict[str, np.ndarray], scenario: str
) -> None:
    ink, confidence = out_of_fold["ink"], out_of_fold["confidence"]
    mask = {
        "no shift": np.ones(len(ink), bool),
        "little ink": ink <= np.quantile(ink, 0.40),
        "much ink": ink >= np.quantile(ink, 0.60),
        "least sure": confidence <= np.quantile(confidence, 0.35),
    }[scenario]
    rows = np.flatnonzero(mask)
    assert len(rows) >= WINDOW
    errors = []
    for take in _windows(rows, 10, seed=1):
        estimated = float(out_of_fold["q"][take].mean())
        realized = float(out_of_fold["correct"][take].mean())
        errors.append(estimated - realized)
    print(f"\n{scenario}: errors per 500-row window {np.round(errors, 3).tolist()}")
    assert max(abs(e) for e in errors) <= TOLERANCE


def test_the_least_sure_shift_really_lowers_accuracy(out_of_fold: dict[str, np.ndarray]) -> None:
    # The shift is not vacuous: the selected rows are clearly harder.
    confidence = out_of_fold["confidence"]
    hard = confidence <= np.quantile(confidence, 0.35)
    assert out_of_fold["correct"][hard].mean() < out_of_fold["correct"].mean() - 0.03


def test_the_estimate_cannot_see_a_concept_change(out_of_fold: dict[str, np.ndarray]) -> None:
    # Inverted digits: the model answers confidently and is mostly wrong.
    estimated = float(out_of_fold["inverted_q"].mean())
    realized = float(out_of_fold["inverted_correct"].mean())
    assert realized < 0.3
    assert estimated - realized > 0.4
