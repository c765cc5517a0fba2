"""Label-free accuracy estimates for classifiers: confidence-based performance estimation (CBPE).

Labels arrive late or never. A calibrated probability that the predicted class is right
is, averaged over a window, the accuracy to expect on that window, so long as the
relation between inputs and classes stays the one the model learnt (a *covariate* shift:
other inputs, same concept). Training stores the calibrator in ``baseline.json``
(:mod:`modelloop.training.calibration`); this module applies it to the outputs in a
version's window:

- **estimate** = ``mean_i q_i``, where ``q_i`` is the calibrated probability of the class
  row ``i`` was served as;
- **band** (:func:`accuracy_band`): two errors add up. If the calibrated probabilities
  were exact, each row would be correct with probability ``q_i``, independently, so the
  window's realized accuracy would have standard deviation ``s = sqrt(Σ q_i (1 − q_i)) / n``.
  They are not exact: the calibrator's expected calibration error on held-out folds,
  ``e`` (``held_out.ece_after`` in ``baseline.json``), bounds how far the mean
  probability may sit from the accuracy on rows like the calibration rows, and it does
  not shrink with the window. The band is the estimate ± ``1.96 · sqrt(s² + e²)``,
  clipped to ``[0, 1]``. A baseline written before the held-out error was recorded has
  ``e = 0`` (the sampling term alone).

Where it cannot work: when the concept changes (the same inputs now mean other
classes, or inputs unlike anything in training, such as inverted digits, that the
network still answers with confidence), the probabilities are wrong and the estimate
stays high while accuracy falls. The drift detector sees those inputs move; the
estimate does not replace it.

Regressors get no estimate: a DLE-style estimate needs a second model trained to predict
the loss, and none is made. A baseline without a calibrator (written before calibrators
were stored) gets none either; :attr:`AccuracyEstimator.reason` says why.

Example:

```python
estimator = AccuracyEstimator.from_baseline(baseline, task="multiclass")
report = estimator.estimate(window_outputs)
report.value, report.lower, report.upper
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.training.calibration import METHODS, calibrate, predicted_classes

Z_95 = 1.959964
"""Two-sided 95 % normal quantile of the band."""


def accuracy_band(q: np.ndarray, calibration_error: float = 0.0) -> tuple[float, float]:
    """The 95 % band of a window's accuracy around the mean of ``q``.

    Args:
        q: Calibrated probability that each row's predicted class is right.
        calibration_error: The calibrator's held-out expected calibration error, which
            does not shrink with the window. Defaults to 0 (the sampling term alone).

    Returns:
        ``(lower, upper)``, clipped to ``[0, 1]``.

    Example:
        >>> [round(v, 6) for v in accuracy_band(np.array([0.9, 0.6, 0.8, 0.5]))]
        [0.278494, 1.0]
    """
    n = len(q)
    value = float(np.mean(q))
    sampling = float(np.sum(q * (1.0 - q))) / n**2
    half = Z_95 * float(np.sqrt(sampling + calibration_error**2))
    return max(0.0, value - half), min(1.0, value + half)


@dataclass(frozen=True, slots=True)
class EstimateReport:
    """The estimated accuracy of one window.

    Attributes:
        value: Mean calibrated probability of the predicted classes.
        lower: Lower end of the 95 % band.
        upper: Upper end of the 95 % band.
        rows: Rows the estimate is over.
        method: The calibrator (``none``, ``temperature`` or ``isotonic``).
    """

    value: float
    lower: float
    upper: float
    rows: int
    method: str


class AccuracyEstimator:
    """Estimates a classifier's accuracy on a window of its outputs, without labels.

    Build it with :meth:`from_baseline`; when no estimate can be made, :attr:`reason`
    says why and :meth:`estimate` returns None.

    Args:
        calibration: The ``"calibration"`` entry of ``baseline.json``, or None.
        task: ``multiclass``, ``binary`` or ``regression``.
        reason: Why there is no estimate (when ``calibration`` is None).
    """

    def __init__(self, calibration: dict[str, Any] | None, task: str, reason: str = "") -> None:
        self.calibration = calibration
        self.task = task
        self.reason = reason if calibration is None else ""

    @classmethod
    def from_baseline(cls, baseline: dict[str, Any] | None, *, task: str) -> AccuracyEstimator:
        """The estimator of one version, or one that says why it makes no estimate.

        Args:
            baseline: The parsed ``baseline.json``, or None when the version has none.
            task: The version's task.

        Returns:
            The estimator.
        """
        if task == "regression":
            return cls(None, task, "no label-free estimate for regressors")
        if baseline is None:
            return cls(None, task, "no baseline, so no calibrator")
        calibration = baseline.get("calibration")
        if not isinstance(calibration, dict):
            return cls(None, task, "the baseline has no calibrator (trained before calibrators were stored)")
        if calibration.get("method") not in METHODS:
            return cls(None, task, f"unknown calibration method {calibration.get('method')!r}")
        return cls(calibration, task)

    @property
    def calibration_error(self) -> float:
        """The calibrator's held-out ECE (0 for a baseline that did not record it)."""
        held_out = (self.calibration or {}).get("held_out")
        if not isinstance(held_out, dict):
            return 0.0
        return float(held_out.get("ece_after", 0.0))

    @property
    def available(self) -> bool:
        """Whether estimates are made."""
        return self.calibration is not None

    def confidences(self, outputs: np.ndarray) -> np.ndarray | None:
        """The calibrated probability that each row's predicted class is right.

        Args:
            outputs: Served outputs, ``[n, k]`` (``[n, 1]`` for a sigmoid binary model).
                Rows with a non-finite output are left out.

        Returns:
            ``[m]`` probabilities (``m <= n``), or None without a calibrator.

        Raises:
            ValueError: The calibrator does not fit the outputs (another class count).
        """
        if self.calibration is None:
            return None
        out = np.asarray(outputs, dtype=np.float64)
        if out.ndim == 1:
            out = out.reshape(-1, 1)
        out = out[np.isfinite(out).all(axis=1)]
        if not len(out):
            return np.zeros(0)
        probs = calibrate(self.calibration, out, self.task)
        return np.asarray(probs[np.arange(len(out)), predicted_classes(out)])

    def estimate(self, outputs: np.ndarray) -> EstimateReport | None:
        """The estimated accuracy of the rows' predictions.

        Args:
            outputs: The served outputs of the window (see :meth:`confidences`).

        Returns:
            The estimate with its band, or None without a calibrator or without rows.

        Raises:
            ValueError: The calibrator does not fit the outputs (another class count).
        """
        q = self.confidences(outputs)
        if q is None or not len(q):
            return None
        lower, upper = accuracy_band(q, self.calibration_error)
        return EstimateReport(
            value=float(q.mean()),
            lower=lower,
            upper=upper,
            rows=len(q),
            method=str(self.calibration.get("method") if self.calibration else ""),
        )
