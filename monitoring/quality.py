"""Data quality of a version's input window, per feature: missing, out of range, became constant.

Inputs can go bad without drifting. Per feature of the baseline, over the window:

- **missing share**: values that are NaN or ±Inf (a numeric tensor has no other way to
  say "missing");
- **out-of-range share**: finite values outside the ``[min, max]`` the feature had in
  training (for a feature constant in training: values other than the constant);
- **became constant**: the feature varied in training, and every finite value in the
  window is now the same. A rarely-set feature (a pixel inked in 1 % of digits) is often
  constant over a few hundred rows by chance, so the verdict needs a window in which a
  constant run is improbable under the baseline: ``p_max^(n−1) < 0.001``, where
  ``p_max`` is the largest bin share of the baseline (no single value can be more
  frequent than its bin).

Example:

```python
checker = QualityChecker(baseline)
report = checker.evaluate(window_rows)
report.max_missing_share, report.max_out_of_range_share, report.became_constant
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.monitoring.window import window_matrix

# Relative tolerance on the baseline range: float32 round trips of the min and max
# must not count as out of range.
_RANGE_RTOL = 1e-6
# Chance, under the baseline, of a constant window below which "became constant" is said.
_CONSTANT_CHANCE = 1e-3


@dataclass(frozen=True, slots=True)
class FeatureQuality:
    """The quality of one feature over a window.

    Attributes:
        name: Feature name from the baseline.
        index: Column index.
        missing_share: Share of NaN or infinite values.
        out_of_range_share: Share of finite values outside the training range.
        became_constant: Varied in training, constant in the window.
    """

    name: str
    index: int
    missing_share: float
    out_of_range_share: float
    became_constant: bool


@dataclass(frozen=True, slots=True)
class QualityReport:
    """The data quality of one window.

    Attributes:
        rows: Rows in the window.
        features: One entry per baseline feature.
    """

    rows: int
    features: tuple[FeatureQuality, ...]

    @property
    def max_missing_share(self) -> float:
        """The largest missing share of any feature (0 without features)."""
        return max((f.missing_share for f in self.features), default=0.0)

    @property
    def max_out_of_range_share(self) -> float:
        """The largest out-of-range share of any feature (0 without features)."""
        return max((f.out_of_range_share for f in self.features), default=0.0)

    @property
    def became_constant(self) -> list[str]:
        """Names of the features that became constant."""
        return [f.name for f in self.features if f.became_constant]

    def worst(self, key: str, k: int = 3) -> list[FeatureQuality]:
        """The ``k`` features with the largest non-zero ``missing_share`` or ``out_of_range_share``."""
        ranked = sorted(self.features, key=lambda f: -float(getattr(f, key)))
        return [f for f in ranked[:k] if getattr(f, key) > 0]


class QualityChecker:
    """Checks windows of live rows against one version's baseline ranges.

    Args:
        baseline: The parsed ``baseline.json``.

    Raises:
        ValueError: The baseline has no features.
    """

    def __init__(self, baseline: dict[str, Any]) -> None:
        features = baseline.get("features")
        if not isinstance(features, list):
            raise ValueError("baseline has no features")
        self.names = [str(f["name"]) for f in features]
        self.low = np.asarray([float(f.get("min", -np.inf)) for f in features])
        self.high = np.asarray([float(f.get("max", np.inf)) for f in features])
        self.constant = np.asarray([bool(f.get("constant", False)) for f in features])
        self.top_share = np.asarray(
            [max((float(p) for p in f.get("proportions", [])), default=1.0) for f in features]
        )

    @property
    def n_features(self) -> int:
        """Columns a window row must have."""
        return len(self.names)

    def evaluate(self, rows: np.ndarray) -> QualityReport:
        """The quality of every feature over the window.

        Args:
            rows: The window, ``[n, n_features]``; NaN and Inf are allowed.

        Returns:
            The report.

        Raises:
            ValueError: ``rows`` has the wrong number of columns.
        """
        rows = window_matrix(rows, self.n_features)
        n = len(rows)
        finite = np.isfinite(rows)
        tolerance = _RANGE_RTOL * np.maximum(1.0, np.maximum(np.abs(self.low), np.abs(self.high)))
        with np.errstate(invalid="ignore"):
            outside = finite & ((rows < self.low - tolerance) | (rows > self.high + tolerance))
        features = []
        for i, name in enumerate(self.names):
            values = rows[finite[:, i], i]
            became = False
            if not self.constant[i] and len(values) >= 2 and float(np.ptp(values)) == 0.0:
                p_max = min(self.top_share[i], 1.0)
                chance = 1.0 if p_max >= 1.0 else math.exp((len(values) - 1) * math.log(max(p_max, 1e-300)))
                became = chance < _CONSTANT_CHANCE
            features.append(
                FeatureQuality(
                    name=name,
                    index=i,
                    missing_share=float(1.0 - finite[:, i].mean()) if n else 0.0,
                    out_of_range_share=float(outside[:, i].mean()) if n else 0.0,
                    became_constant=became,
                )
            )
        return QualityReport(rows=n, features=tuple(features))
