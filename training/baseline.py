"""Reference statistics that drift detection compares live traffic against.

The bins are quantile edges of the training rows. Binning is defined once here and
shared with the monitoring side: a value ``v`` falls in bin ``i`` where ``i`` counts
the inner edges strictly below ``v`` (``np.searchsorted(edges, v, side="left")``), so
bin 0 is ``(-inf, e0]`` and the last bin is ``(e_last, inf)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelloop.training.calibration import fit_calibration
from modelloop.training.spec import TaskType

SCHEMA_VERSION = 1
DEFAULT_BINS = 10
DEFAULT_SAMPLE_ROWS = 1000


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Maps values to bin ids over inner ``edges`` (see the module docstring)."""
    return np.searchsorted(edges, values, side="left")


def proportions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The share of ``values`` in each of the ``len(edges) + 1`` bins."""
    counts = np.bincount(bin_index(values, edges), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def quantile_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Unique inner quantile edges, at most ``bins - 1`` of them.

    Repeated quantiles of discrete features (pixel values, say) collapse, so a feature
    may get fewer bins; a constant feature gets none.
    """
    # inverted_cdf keeps edges on observed values, so discrete features bin cleanly.
    qs = np.quantile(values.astype(np.float64), np.linspace(0.0, 1.0, bins + 1)[1:-1], method="inverted_cdf")
    edges = np.unique(qs)
    # The top edge equal to the maximum would leave the last bin empty by construction.
    return edges[edges < values.max()] if len(values) else edges


def feature_reference(name: str, index: int, values: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Reference entry of one feature: bins, proportions and summary statistics."""
    lo, hi = float(values.min()), float(values.max())
    constant = bool(hi - lo <= 1e-12 * max(1.0, abs(hi)))
    edges = np.empty(0) if constant else quantile_edges(values, bins)
    return {
        "name": name,
        "index": index,
        "constant": constant,
        "min": lo,
        "max": hi,
        "mean": float(values.mean()),
        "std": float(values.std()),
        "edges": [float(e) for e in edges],
        "proportions": [float(p) for p in proportions(values, edges)],
    }


def prediction_reference(task: TaskType, outputs: np.ndarray, class_labels: list[str]) -> dict[str, Any]:
    """Distribution of the model's predictions on the validation rows.

    Classifiers record the share of each predicted class; regressors record quantile
    bins of the predicted values.
    """
    if task == "multiclass":
        classes = outputs.argmax(axis=1)
    elif task == "binary":
        classes = (outputs.reshape(-1) >= 0.5).astype(np.int64)
    else:
        values = outputs.reshape(-1)
        edges = quantile_edges(values)
        return {
            "kind": "binned",
            "edges": [float(e) for e in edges],
            "proportions": [float(p) for p in proportions(values, edges)],
        }
    n_classes = max(len(class_labels), int(classes.max()) + 1)
    counts = np.bincount(classes, minlength=n_classes)
    return {
        "kind": "class",
        "labels": list(class_labels),
        "proportions": [float(c) for c in counts / max(len(classes), 1)],
    }


def build_baseline(
    *,
    x_train: np.ndarray,
    feature_names: list[str],
    input_name: str,
    task: TaskType,
    val_outputs: np.ndarray,
    class_labels: list[str],
    seed: int,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    bins: int = DEFAULT_BINS,
    val_targets: np.ndarray | None = None,
    calibration_outputs: np.ndarray | None = None,
    calibration_targets: np.ndarray | None = None,
    calibration_rows: str = "validation",
) -> dict[str, Any]:
    """Builds the content of ``baseline.json``.

    Args:
        x_train: Raw training features, ``[n, n_features]``.
        feature_names: One name per column.
        input_name: The served input the features arrive in.
        task: The task type.
        val_outputs: Model outputs on the validation rows.
        class_labels: Class names; empty for regression.
        seed: Seed of the reference sample draw.
        sample_rows: Most rows kept in the reference sample (for KS tests). Defaults
            to 1000.
        bins: Quantile bins per feature. Defaults to 10.
        val_targets: True classes of the validation rows. When given for a classifier
            without ``calibration_outputs``, the calibrator is fitted on ``val_outputs``.
            Defaults to None.
        calibration_outputs: Model outputs on rows that neither the weights nor early
            stopping saw. With ``calibration_targets``, a classifier's calibrator is
            fitted on them and stored under ``"calibration"`` (see
            :mod:`modelloop.training.calibration`), for label-free accuracy estimates
            at serving. Defaults to None (``val_outputs`` when ``val_targets`` is given,
            else no calibrator).
        calibration_targets: True classes of those rows. Defaults to None.
        calibration_rows: What the calibration rows are, recorded in the entry.
            Defaults to ``validation``.

    Returns:
        A JSON-serialisable dict.
    """
    rng = np.random.default_rng(seed)
    take = rng.choice(len(x_train), size=min(sample_rows, len(x_train)), replace=False)
    baseline: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "input": input_name,
        "rows": len(x_train),
        "bins": bins,
        "features": [feature_reference(name, i, x_train[:, i], bins) for i, name in enumerate(feature_names)],
        "reference_sample": x_train[np.sort(take)].round(6).tolist(),
        "predictions": prediction_reference(task, val_outputs, class_labels),
    }
    if calibration_outputs is None and val_targets is not None:
        calibration_outputs, calibration_targets = val_outputs, val_targets
    has_rows = calibration_targets is not None and len(calibration_targets) > 0
    if (
        task != "regression"
        and calibration_outputs is not None
        and calibration_targets is not None
        and has_rows
    ):
        baseline["calibration"] = fit_calibration(
            calibration_outputs, calibration_targets, task=task, seed=seed, fitted_on=calibration_rows
        )
    return baseline
