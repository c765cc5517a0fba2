"""Drift statistics and the detector that compares live inputs with a version's baseline.

Pure numpy and scipy. The baseline is the ``baseline.json`` that training writes
(:mod:`modelloop.training.baseline`); its bins are reused through
:func:`~modelloop.training.baseline.proportions`, so training and monitoring bin a value
the same way by construction.

Per feature:

- **PSI** on the baseline's quantile bins, ``Σ (a − e)·ln(a / e)``, with both shares
  clipped to ``max(p, eps)`` so an empty bin gives a large but finite term.
- **KS**: the two-sample Kolmogorov–Smirnov test (``scipy.stats.ks_2samp``) of the
  window against the baseline's ``reference_sample`` column.
- A feature drifts when ``psi >= psi_threshold`` or ``p < ks_pvalue``.
- **Constant-in-baseline** features have no bins and no spread to test (KS is skipped).
  They are scored as a two-bin feature, "equal to the constant" / "different", with the
  baseline at ``[1, 0]``: the PSI then grows with the share of differing values, and the
  feature drifts when it reaches ``psi_threshold`` (about 3.5 % of values differing at
  0.2). "Any value differs" would be too brittle: a pixel that is non-zero in 1 of 1797
  digits is constant in a training split, and one such held-out row would flag it.

The dataset drifts when the share of drifted features is ``>= drift_share`` (Evidently's
rule). Prediction drift is the PSI of the predicted-class distribution (classifiers) or of
the predicted values on the baseline's bins (regressors); the ``ModelPredictionDrift`` rule
fires at :data:`PREDICTION_DRIFT_THRESHOLD`.

Example:

```python
detector = DriftDetector(json.loads(Path("models/digits/1/baseline.json").read_text()))
report = detector.evaluate(window_rows, predicted_classes)
report.drifted, report.share, report.top(3)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from modelloop.monitoring.window import window_matrix
from modelloop.training.baseline import proportions

DEFAULT_EPSILON = 1e-4
PREDICTION_DRIFT_THRESHOLD = 0.25
"""Prediction-drift PSI at which ``ModelPredictionDrift`` fires (the rule's ``>= 0.25``).

0.25 is the usual "significant shift" PSI. On digits, 400 random held-out rows against
the validation split's predicted classes give about 0.05 (sampling noise of ten classes
on a few hundred rows); only the digits 3, 5, 8 and 9 give about 4.
"""
# Relative tolerance for "differs from the constant": float32 round trips of the
# constant must not count as drift.
_CONSTANT_RTOL = 1e-6


def psi(
    reference: np.ndarray | list[float], current: np.ndarray | list[float], eps: float = DEFAULT_EPSILON
) -> float:
    """Population stability index of two distributions over the same bins.

    Args:
        reference: Expected shares per bin (sum 1).
        current: Actual shares per bin (sum 1).
        eps: Floor for a share, so empty bins stay finite. Defaults to 1e-4.

    Returns:
        ``Σ (a − e)·ln(a / e)`` with ``e, a`` clipped to at least ``eps``; 0 for identical
        distributions.

    Example:
        >>> round(psi([0.25] * 4, [0.1, 0.2, 0.3, 0.4]), 6)
        0.228217
    """
    e = np.maximum(np.asarray(reference, dtype=np.float64), eps)
    a = np.maximum(np.asarray(current, dtype=np.float64), eps)
    if e.shape != a.shape:
        raise ValueError(f"psi needs the same bins: {e.shape} vs {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov test (two-sided, scipy's ``method='auto'``).

    Args:
        reference: Reference values.
        current: Current values.

    Returns:
        ``(D, p_value)``: the largest distance between the two empirical CDFs and the
        probability of one at least as large under "same distribution".
    """
    result = stats.ks_2samp(np.asarray(reference, np.float64), np.asarray(current, np.float64))
    return float(result.statistic), float(result.pvalue)


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """The KS distance ``D`` alone; see :func:`ks_test`."""
    return ks_test(reference, current)[0]


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """The drift of one feature.

    Attributes:
        name: Feature name from the baseline.
        index: Column index.
        psi: PSI on the baseline's bins (constant features: over equal/different).
        ks: KS distance, or None when not tested (constant feature, no reference sample).
        p_value: KS p-value, or None when not tested.
        drifted: The verdict.
        constant: Whether the feature was constant in the baseline.
    """

    name: str
    index: int
    psi: float
    ks: float | None
    p_value: float | None
    drifted: bool
    constant: bool = False


@dataclass(frozen=True, slots=True)
class DriftReport:
    """The drift of one window against one baseline.

    Attributes:
        rows: Rows in the window.
        features: One entry per baseline feature.
        n_drifted: Features that drifted.
        share: ``n_drifted / len(features)``.
        drifted: ``share >= drift_share``.
        prediction_psi: PSI of the prediction distribution, or None without predictions.
    """

    rows: int
    features: tuple[FeatureDrift, ...]
    n_drifted: int
    share: float
    drifted: bool
    prediction_psi: float | None

    def top(self, k: int = 5) -> list[FeatureDrift]:
        """The ``k`` most drifted features: drifted ones first, then by PSI."""
        return sorted(self.features, key=lambda f: (not f.drifted, -f.psi))[:k]


class DriftDetector:
    """Compares windows of live rows with one version's baseline.

    Args:
        baseline: The parsed ``baseline.json``.
        psi_threshold: A feature drifts when its PSI reaches this. Defaults to 0.2.
        ks_pvalue: A feature drifts when its KS p-value is below this. Defaults to 0.01.
        drift_share: The dataset drifts when this share of features drifts. Defaults to 0.5.
        eps: PSI floor for empty bins. Defaults to 1e-4.

    A baseline may list no features (``"features": []``, a model whose input is strings):
    then only prediction drift is measured and the dataset never drifts.

    Raises:
        ValueError: The baseline lacks the features list or has inconsistent bins.
    """

    def __init__(
        self,
        baseline: dict[str, Any],
        *,
        psi_threshold: float = 0.2,
        ks_pvalue: float = 0.01,
        drift_share: float = 0.5,
        eps: float = DEFAULT_EPSILON,
    ) -> None:
        features = baseline.get("features")
        if not isinstance(features, list):
            raise ValueError("baseline has no features")
        self.psi_threshold = psi_threshold
        self.ks_pvalue = ks_pvalue
        self.drift_share = drift_share
        self.eps = eps
        self.names = [str(f["name"]) for f in features]
        self.constant = [bool(f.get("constant", False)) for f in features]
        self.constant_value = [float(f.get("min", 0.0)) for f in features]
        self.edges = [np.asarray(f.get("edges", []), dtype=np.float64) for f in features]
        self.proportions = [np.asarray(f["proportions"], dtype=np.float64) for f in features]
        for name, edges, props in zip(self.names, self.edges, self.proportions, strict=True):
            if len(props) != len(edges) + 1:
                raise ValueError(
                    f"baseline feature {name!r}: {len(edges)} edges but {len(props)} proportions"
                )
        sample = baseline.get("reference_sample")
        reference = np.asarray(sample, dtype=np.float64) if sample else None
        if reference is not None and (reference.ndim != 2 or reference.shape[1] != len(features)):
            reference = None  # a malformed sample disables KS rather than every verdict
        self.reference = reference
        self.prediction_reference: dict[str, Any] = dict(baseline.get("predictions") or {})

    @property
    def n_features(self) -> int:
        """Columns a window row must have."""
        return len(self.names)

    def _feature(self, i: int, values: np.ndarray) -> FeatureDrift:
        values = values[np.isfinite(values)]
        if self.constant[i]:
            c = self.constant_value[i]
            differs = (
                float(np.mean(~np.isclose(values, c, rtol=_CONSTANT_RTOL, atol=1e-12)))
                if len(values)
                else 0.0
            )
            score = psi([1.0, 0.0], [1.0 - differs, differs], self.eps)
            return FeatureDrift(
                self.names[i], i, score, None, None, score >= self.psi_threshold, constant=True
            )
        score = psi(self.proportions[i], proportions(values, self.edges[i]), self.eps)
        ks = p_value = None
        if self.reference is not None and len(values):
            ks, p_value = ks_test(self.reference[:, i], values)
        drifted = score >= self.psi_threshold or (p_value is not None and p_value < self.ks_pvalue)
        return FeatureDrift(self.names[i], i, score, ks, p_value, bool(drifted))

    def prediction_drift(self, predictions: np.ndarray) -> float | None:
        """PSI of the predictions against the baseline's prediction distribution.

        Args:
            predictions: Predicted class ids (classifiers) or values (regressors).

        Returns:
            The PSI, or None when the baseline has no prediction reference or there are
            no predictions.
        """
        ref = self.prediction_reference
        props = np.asarray(ref.get("proportions", []), dtype=np.float64)
        predictions = np.asarray(predictions).reshape(-1)
        if not len(props) or not len(predictions):
            return None
        if ref.get("kind") == "class":
            classes = predictions.astype(np.int64)
            n = max(len(props), int(classes.max()) + 1)
            current = np.bincount(np.clip(classes, 0, None), minlength=n) / len(classes)
            return psi(np.pad(props, (0, n - len(props))), current, self.eps)
        edges = np.asarray(ref.get("edges", []), dtype=np.float64)
        return psi(props, proportions(predictions.astype(np.float64), edges), self.eps)

    def evaluate(self, rows: np.ndarray, predictions: np.ndarray | None = None) -> DriftReport:
        """Computes every feature's drift, the dataset verdict and prediction drift.

        Args:
            rows: The window, ``[n, n_features]``.
            predictions: Predicted class ids or values of the same rows. Defaults to None.

        Returns:
            The report.

        Raises:
            ValueError: ``rows`` has the wrong number of columns.
        """
        rows = window_matrix(rows, self.n_features)
        features = tuple(self._feature(i, rows[:, i]) for i in range(self.n_features))
        n_drifted = sum(f.drifted for f in features)
        # No features (an input of strings): no feature drift, prediction drift only.
        share = n_drifted / len(features) if features else 0.0
        return DriftReport(
            rows=len(rows),
            features=features,
            n_drifted=n_drifted,
            share=share,
            drifted=share >= self.drift_share,
            prediction_psi=None if predictions is None else self.prediction_drift(predictions),
        )
