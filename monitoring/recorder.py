"""The control plane's recorder: the prediction log's requests, stored and in the drift windows.

:class:`~modelloop.monitoring.ingest.LogIngest` reads segments of the prediction log and
hands their requests to :meth:`LogRecorder.write`, which converts them per model version
with a few array operations (stacking the rows of every request, not one request at a
time), writes them to the predictions table in one transaction (what labels join), and only
then appends their rows to the drift windows, so that a batch read again after an outage
is not counted twice. This is the one path by which answered requests reach monitoring:
the serving side only logs (:mod:`modelloop.serving.predlog`).

Example:

```python
recorder = LogRecorder(stores.predictions, windows, metrics, describe=service.version_info)
recorder.write(requests)  # (model, version, request_id, time, inputs, outputs, trace[, digest])
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.logformat import input_digest
from modelloop.monitoring.stores.predictions import PredictionWriter
from modelloop.monitoring.stores.records import PredictionRecord
from modelloop.monitoring.window import WindowSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """How to read the requests of one model version.

    Attributes:
        task: ``multiclass``, ``binary`` or ``regression``.
        classes: Number of classes (0 for regressors).
        input_name: The input the baseline describes; None = the request's first input.
        output_name: The output predictions come from; None = the response's first output.
    """

    task: str = "multiclass"
    classes: int = 0
    input_name: str | None = None
    output_name: str | None = None


def predicted_values(outputs: np.ndarray, task: str) -> np.ndarray:
    """Predicted class ids (classifiers) or values (regressors) of ``[n, k]`` outputs.

    A binary classifier with one output column is thresholded at 0.5; with several
    columns (and for multiclass) the class is the argmax.
    """
    if task == "regression":
        return outputs[:, 0].astype(np.float64)
    if outputs.shape[1] == 1:
        return (outputs[:, 0] >= 0.5).astype(np.int64)
    return outputs.argmax(axis=1).astype(np.int64)


class LogRecorder:
    """Stores the prediction log's requests and fills the drift windows with their rows.

    Args:
        store: Where predictions are stored (the label join reads them).
        windows: The drift windows to fill.
        describe: ``(model, version) -> VersionInfo`` (cached by the caller).
        sample_features: Input columns stored per row. Defaults to 64.
    """

    def __init__(
        self,
        store: PredictionWriter,
        windows: WindowSet,
        describe: Callable[[str, int], VersionInfo],
        *,
        sample_features: int = 64,
    ) -> None:
        self.store = store
        self.windows = windows
        self.describe = describe
        self.sample_features = sample_features

    def write(self, batch: list[Any]) -> int:
        """Stores a batch of answered requests, then adds their rows to the drift windows.

        The windows take the rows only once the store has them, so a batch that is retried
        after an outage is not counted twice.

        Args:
            batch: ``(model, version, request_id, time, inputs, outputs, trace[, digest])``
                tuples.

        Returns:
            Requests stored.

        Raises:
            StoreUnavailable: The store cannot be written; nothing was added.
        """
        records, windows = self._convert_all(batch)
        if records:
            self.store.record(records)
        for model, version, rows, predicted, out in windows:
            self.windows.add(model, version, rows, predicted, out)
        return len(records)

    def _convert_all(self, batch: list[Any]) -> tuple[list[PredictionRecord], list[tuple[Any, ...]]]:
        # One conversion per model version and batch, not per request: the rows of every
        # request of a version are stacked, cast and scored with a few array operations,
        # and the drift window takes them in one call.
        groups: dict[tuple[str, int], list[Any]] = {}
        for item in batch:
            groups.setdefault((item[0], item[1]), []).append(item)
        records: list[PredictionRecord] = []
        windows: list[tuple[Any, ...]] = []
        for (model, version), items in groups.items():
            try:
                records.extend(self._convert(model, version, items, windows))
            except Exception:
                logger.exception("cannot log %d requests of model %s version %s", len(items), model, version)
        return records, windows

    def _convert(
        self, model: str, version: int, items: list[Any], windows: list[tuple[Any, ...]]
    ) -> list[PredictionRecord]:
        info = self.describe(model, version)
        picked: list[tuple[str, float, np.ndarray, np.ndarray, str]] = []
        for item in items:
            rid, created, inputs, outputs = item[2], item[3], item[4], item[5]
            x = inputs.get(info.input_name) if info.input_name else None
            if x is None:
                x = next(iter(inputs.values()), None)
            y = outputs.get(info.output_name) if info.output_name else None
            if y is None:
                y = next(iter(outputs.values()), None)
            if x is None or y is None:
                continue
            x, y = np.asarray(x), np.asarray(y)
            n = x.shape[0] if x.ndim else 1
            if y.dtype.kind not in "iufb" or (y.shape[0] if y.ndim else 1) != n:
                continue  # string outputs: no prediction to log
            # String inputs (BYTES) have no features to bin: the prediction is logged with
            # no input columns, so accuracy, prediction drift and the estimate still work.
            rows = x.reshape(n, -1) if x.dtype.kind in "iufb" else np.zeros((n, 0))
            digest = item[7] if len(item) > 7 else input_digest(x)
            picked.append((rid, created, rows, y.reshape(n, -1), digest))
        if not picked:
            return []
        widths = {(x.shape[1], y.shape[1]) for _, _, x, y, _ in picked}
        if len(widths) > 1:
            # Variable-width inputs: the rows cannot share one array; convert each alone.
            records: list[PredictionRecord] = []
            for one in picked:
                records.extend(self._records(model, version, info, [one], windows))
            return records
        return self._records(model, version, info, picked, windows)

    def _records(
        self,
        model: str,
        version: int,
        info: VersionInfo,
        picked: list[tuple[str, float, np.ndarray, np.ndarray, str]],
        windows: list[tuple[Any, ...]],
    ) -> list[PredictionRecord]:
        rows = np.concatenate([x for _, _, x, _, _ in picked]).astype(np.float64)
        out = np.concatenate([y for _, _, _, y, _ in picked]).astype(np.float64)
        predicted = predicted_values(out, info.task) if out.shape[1] else None
        windows.append((model, version, rows, predicted, out))
        # Contiguous, so that each record's slice serialises as an array (orjson needs C order).
        sample = np.ascontiguousarray(rows[:, : self.sample_features])
        empty = np.zeros(0, dtype=np.int64)
        records = []
        start = 0
        for rid, created, x, _, digest in picked:
            end = start + x.shape[0]
            records.append(
                PredictionRecord(
                    request_id=rid,
                    model=model,
                    version=version,
                    created=created,
                    inputs=sample[start:end],
                    outputs=out[start:end],
                    predicted=empty if predicted is None else predicted[start:end],
                    task=info.task,
                    classes=info.classes,
                    input_hash=digest,
                )
            )
            start = end
        return records
