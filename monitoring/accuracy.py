"""Accuracy (classifiers) and mean absolute error (regressors) over recent labelled rows.

Labels arrive late, through the feedback route, and are joined to logged predictions
in the store; this module only scores the joined rows.

Example:

```python
report = score_labelled(store.recent_labelled("digits", 1, 500), task="multiclass", min_labels=50)
report.value if report.ready else None
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelloop.monitoring.stores.records import CLASSIFIER_TASKS, LabelledRow


@dataclass(frozen=True, slots=True)
class AccuracyReport:
    """The score of one version over its most recent labelled rows.

    Attributes:
        metric: ``accuracy`` (classifiers) or ``mae`` (regressors).
        value: The score over ``rows``, or None without rows.
        rows: Labelled rows scored (at most the window).
        ready: Whether ``rows >= min_labels``; only then is the score exported.
    """

    metric: str
    value: float | None
    rows: int
    ready: bool


def score_labelled(rows: Sequence[LabelledRow], *, task: str, min_labels: int = 50) -> AccuracyReport:
    """Scores labelled rows.

    Args:
        rows: Rows with prediction and target (the window, newest first).
        task: ``multiclass``, ``binary`` or ``regression``.
        min_labels: Rows needed before the score counts. Defaults to 50.

    Returns:
        Accuracy for classifiers, mean absolute error for regressors.
    """
    metric = "accuracy" if task in CLASSIFIER_TASKS else "mae"
    if not rows:
        return AccuracyReport(metric, None, 0, False)
    predicted = np.asarray([r.predicted for r in rows], dtype=np.float64)
    target = np.asarray([r.target for r in rows], dtype=np.float64)
    if metric == "accuracy":
        value = float(np.mean(predicted == target))
    else:
        value = float(np.mean(np.abs(predicted - target)))
    return AccuracyReport(metric, value, len(rows), len(rows) >= min_labels)
