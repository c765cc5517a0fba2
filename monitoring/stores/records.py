"""What the stores keep and return: logged predictions, labels and their counts.

Plain data, with no SQL: monitoring's analysis (accuracy, the label checks) and the HTTP
surface read these types without the stores' engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelloop.tokens import ANONYMOUS_SOURCE

CLASSIFIER_TASKS = frozenset({"multiclass", "binary"})


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One logged request.

    Attributes:
        request_id: The id returned to the client in ``x-request-id``.
        model: Model name.
        version: The version that answered.
        created: Unix time of the answer.
        inputs: One list per row: the first ``sample_features`` input columns (a list, or a
            2-D array that is logged as the same JSON).
        outputs: One list per row: the model's first output (list or array).
        predicted: One predicted class id (classifiers) or value (regressors) per row.
        task: ``multiclass``, ``binary`` or ``regression``; decides what a valid target is.
        classes: Number of classes (0 for regressors); class ids run ``0..classes-1``.
    """

    request_id: str
    model: str
    version: int
    created: float
    inputs: list[list[float]] | np.ndarray
    outputs: list[list[float]] | list[float] | np.ndarray
    predicted: list[int | float] | np.ndarray
    task: str = "multiclass"
    classes: int = 0
    input_hash: str = ""
    """A digest of the request's whole input rows ("" = unknown: never ambiguous)."""


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """The labels of one request, one target per row, as the client sent them (unchecked)."""

    request_id: str
    targets: list[Any]


@dataclass(slots=True)
class FeedbackResult:
    """What :meth:`~modelloop.monitoring.stores.feedback.FeedbackStore.add_feedback` did with each item.

    Attributes:
        accepted: Ids whose labels were stored now.
        unknown: Ids with no logged prediction of this model.
        duplicate: Ids this source already labelled (its first label is kept; other
            sources' labels of the same prediction are kept beside it).
        ambiguous: Id -> why its labels were refused: the id answered requests with
            different inputs, so no label can be paired with one of them.
        invalid: Id -> why its targets were refused (count, type, class range).
        labels: Version -> labelled rows accepted now.
        source: The labeler source the labels were stored under.
        quarantined: Whether that source was quarantined: its labels are stored and
            marked, and the label checks leave them out.
        rows: ``(version, outcome)`` -> rows, for ``modelloop_feedback_total``: outcome
            ``accepted`` or ``quarantined`` for stored labels, ``duplicate``, ``invalid``,
            ``ambiguous`` or ``unknown`` (version "") for refused ones.
    """

    accepted: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)
    ambiguous: dict[str, str] = field(default_factory=dict)
    labels: dict[int, int] = field(default_factory=dict)
    source: str = ANONYMOUS_SOURCE
    quarantined: bool = False
    rows: dict[tuple[str, str], int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer of the feedback route."""
        return {
            "accepted": self.accepted,
            "unknown": self.unknown,
            "duplicate": self.duplicate,
            "invalid": self.invalid,
            "ambiguous": self.ambiguous,
            "source": self.source,
            "quarantined": self.quarantined,
        }


@dataclass(frozen=True, slots=True)
class SourceStat:
    """Labels of one source on one champion version, for one predicted class, label and confidence.

    Attributes:
        version: The version that made the predictions.
        source: The labeler source.
        predicted: The class the version predicted.
        target: The class the label named.
        confidence: The version's top-class probability, in whole percent (0..100).
        labels: How many labelled rows share these values.
    """

    version: int
    source: str
    predicted: int
    target: int
    confidence: int
    labels: int


@dataclass(frozen=True, slots=True)
class SourceLabels:
    """What one source has labelled of one model.

    Attributes:
        requests: Labelled requests.
        labels: Labelled rows.
        quarantined_labels: Rows that arrived while the source was quarantined.
    """

    requests: int
    labels: int
    quarantined_labels: int


@dataclass(frozen=True, slots=True)
class LabelledRow:
    """One row with both a prediction and a label."""

    predicted: int | float
    target: int | float
    created: float
