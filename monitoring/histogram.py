"""Baseline and current histograms of a feature, for the health page.

The bins are the baseline's own (quantile edges of the training rows), and the current
shares are counted with :func:`~modelloop.training.baseline.proportions`, as drift
detection counts them, so the two bar sets compare like for like.

Example:

```python
histograms = feature_histograms(baseline, window_rows, ["pixel_3_4"])
histograms[0].baseline, histograms[0].current
```
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.training.baseline import proportions


@dataclass(frozen=True, slots=True)
class FeatureHistogram:
    """One feature's shares per baseline bin, in training and in the current window.

    Attributes:
        name: Feature name.
        edges: Inner bin edges (``len(baseline) - 1`` of them); empty for a feature that
            was constant in training, whose two bins are "the constant" and "other".
        baseline: Shares of the training rows per bin.
        current: Shares of the window's finite values per bin.
    """

    name: str
    edges: tuple[float, ...]
    baseline: tuple[float, ...]
    current: tuple[float, ...]

    def bin_labels(self) -> list[str]:
        """A short text label per bin: ``≤ e0``, ``e0–e1``, ..., ``> e_last``."""
        if not self.edges:
            return ["constant", "other"] if len(self.baseline) == 2 else ["all"]
        e = [f"{v:g}" for v in self.edges]
        return [f"≤{e[0]}", *(f"{a}–{b}" for a, b in itertools.pairwise(e)), f">{e[-1]}"]


def feature_histograms(
    baseline: dict[str, Any], rows: np.ndarray, names: Sequence[str]
) -> tuple[FeatureHistogram, ...]:
    """The histograms of the named features over a window.

    Args:
        baseline: The parsed ``baseline.json``.
        rows: The window, ``[n, n_features]``.
        names: Features to draw, in order; names the baseline lacks are skipped.

    Returns:
        One histogram per known name.
    """
    by_name = {str(f.get("name")): (i, f) for i, f in enumerate(baseline.get("features", []))}
    found = []
    for name in names:
        if name not in by_name or rows.ndim != 2:
            continue
        i, feature = by_name[name]
        if i >= rows.shape[1]:
            continue
        values = rows[:, i]
        values = values[np.isfinite(values)]
        if feature.get("constant"):
            c = float(feature.get("min", 0.0))
            differs = float(np.mean(~np.isclose(values, c))) if len(values) else 0.0
            found.append(FeatureHistogram(name, (), (1.0, 0.0), (1.0 - differs, differs)))
            continue
        edges = np.asarray(feature.get("edges", []), dtype=np.float64)
        current = proportions(values, edges) if len(values) else np.zeros(len(edges) + 1)
        found.append(
            FeatureHistogram(
                name,
                tuple(float(e) for e in edges),
                tuple(float(p) for p in feature.get("proportions", [])),
                tuple(float(p) for p in current),
            )
        )
    return tuple(found)
