"""Sliding windows of recent input rows and predictions, per model version, in memory.

The observer's worker thread appends; the evaluator snapshots. Both hold the window's
lock only for a copy, so neither waits on the other's computation.

Example:

```python
windows = WindowSet(size=1000)
windows.add("digits", 1, rows, predicted)
rows, predicted = windows.get("digits", 1).snapshot()
```
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np


def window_matrix(rows: np.ndarray, n_features: int) -> np.ndarray:
    """A window's rows as float64 ``[n, n_features]``, checked against the baseline's width.

    Raises:
        ValueError: ``rows`` is not two-dimensional with ``n_features`` columns.
    """
    matrix = np.asarray(rows, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != n_features:
        raise ValueError(f"window rows have shape {matrix.shape}; the baseline has {n_features} features")
    return matrix


class InputWindow:
    """The last ``size`` rows of one model version, with their predictions.

    Args:
        size: Rows kept; older rows fall off.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: deque[np.ndarray] = deque(maxlen=size)
        self._predicted: deque[float] = deque(maxlen=size)
        # The served outputs of the same rows, for the label-free accuracy estimate.
        self._outputs: deque[np.ndarray] = deque(maxlen=size)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self, rows: np.ndarray, predicted: np.ndarray | None = None, outputs: np.ndarray | None = None
    ) -> None:
        """Appends rows (``[n, features]``) and, when known, their predictions (``[n]``)
        and outputs (``[n, k]``).

        Rows without predictions keep the prediction column aligned with NaN.
        """
        if predicted is None or len(predicted) != len(rows):
            predicted = np.full(len(rows), np.nan)
        with self._lock:
            self._rows.extend(rows)
            self._predicted.extend(predicted.tolist())
            if outputs is not None and len(outputs) == len(rows):
                self._outputs.extend(outputs)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy: rows ``[n, features]`` (float64) and predictions ``[n]`` (NaN where unknown)."""
        with self._lock:
            rows = list(self._rows)
            predicted = list(self._predicted)
        if not rows:
            return np.zeros((0, 0)), np.zeros(0)
        width = rows[-1].shape[0]
        # A version's rows all have one width; this guards a mixed window all the same.
        keep = [i for i, r in enumerate(rows) if r.shape[0] == width]
        return (
            np.stack([rows[i] for i in keep]).astype(np.float64),
            np.asarray([predicted[i] for i in keep], dtype=np.float64),
        )

    def outputs(self) -> np.ndarray:
        """A copy of the most recent outputs, ``[m, k]`` float64 (``[0, 0]`` when none).

        Rows whose output width differs from the newest one's are left out.
        """
        with self._lock:
            outputs = list(self._outputs)
        if not outputs:
            return np.zeros((0, 0))
        width = outputs[-1].shape[0]
        return np.stack([o for o in outputs if o.shape[0] == width]).astype(np.float64)

    def clear(self) -> None:
        """Empties the window."""
        with self._lock:
            self._rows.clear()
            self._predicted.clear()
            self._outputs.clear()


class WindowSet:
    """One :class:`InputWindow` per ``(model, version)``, made on first use.

    Args:
        size: Rows per window.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._windows: dict[tuple[str, int], InputWindow] = {}
        self._lock = threading.Lock()

    def get(self, model: str, version: int) -> InputWindow:
        """The window of one version (empty if nothing was added yet)."""
        key = (model, version)
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = InputWindow(self.size)
            return window

    def add(
        self,
        model: str,
        version: int,
        rows: np.ndarray,
        predicted: np.ndarray | None = None,
        outputs: np.ndarray | None = None,
    ) -> None:
        """Appends rows (and their predictions and outputs) to one version's window."""
        self.get(model, version).add(rows, predicted, outputs)

    def keys(self) -> list[tuple[str, int]]:
        """Every ``(model, version)`` with a window."""
        with self._lock:
            return list(self._windows)

    def discard(self, model: str, version: int) -> None:
        """Forgets one version's window (it was unloaded)."""
        with self._lock:
            self._windows.pop((model, version), None)
