"""Label checks: which labeler sources to trust, judged by their labels on confident predictions.

A label that contradicts a prediction the champion made with high confidence is rare
when the labeler is honest and the inputs look like the training data: the champion is
almost never confidently wrong there. So, per source, the store counts which class the
champion predicted, how confident it was and which class the label named
(:class:`~modelloop.monitoring.stores.records.SourceStat`), and :func:`assess_sources` turns those
counts into a :class:`SourceVerdict`: the source's agreement with the confident
predictions, its confusion (which class it relabelled as which) and, when the
:class:`~modelloop.monitoring.settings.QuarantineSettings` say so, a quarantine with its
reasons.

The monitoring service runs the assessment after every evaluation and exports it
(``modelloop_feedback_source_quarantined``, ``modelloop_feedback_source_agreement``);
``modelloop retrain`` runs the same assessment on the same counts through
:class:`SourceQuarantine`, so the server and the retrain agree on who is quarantined.

Example:

```python
verdicts = assess_sources(store.source_stats("digits"), champion_of(card, baseline), QuarantineSettings())
[v.source for v in verdicts.values() if v.quarantined]  # ['mallory']
```
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelloop import layout
from modelloop.monitoring.drift import psi
from modelloop.monitoring.settings import QuarantineSettings
from modelloop.monitoring.stores.feedback import SourceCounts
from modelloop.monitoring.stores.records import SourceStat

logger = logging.getLogger(__name__)

# One-sided 99 % normal quantile: a rate check fires only when the source's rate is above
# the allowance with 99 % confidence (Wilson score interval), not on a lucky streak.
_Z = 2.326
# Relabelled class pairs listed per source in reports, most frequent first (bounded for models
# with many classes).
_TOP_RELABELS = 20


@dataclass(frozen=True)
class Champion:
    """What the checks need to know of the serving version.

    Attributes:
        version: The version.
        error: Its test error (1 - test accuracy), or None when its card has none.
        prediction_proportions: The share of each class in its baseline predictions, or
            None when its baseline has none.
        labels: Its class labels, for messages; empty = class ids.
    """

    version: int
    error: float | None = None
    prediction_proportions: np.ndarray | None = None
    labels: tuple[str, ...] = ()

    def name(self, cls: int) -> str:
        """A class as reports show it: its label when the card has one, else its id."""
        return self.labels[cls] if 0 <= cls < len(self.labels) else str(cls)


def champion_of(version: int, card: layout.ModelCard | None, baseline: Mapping[str, Any] | None) -> Champion:
    """The :class:`Champion` of a version from its model card and baseline (either may be missing)."""
    error: float | None = None
    labels: tuple[str, ...] = ()
    if card is not None:
        labels = tuple(card.labels)
        test = (card.extra.get("metrics") or {}).get("test") or {}
        accuracy = test.get("accuracy") if isinstance(test, dict) else None
        if isinstance(accuracy, int | float) and 0 <= accuracy <= 1:
            error = 1.0 - float(accuracy)
    proportions: np.ndarray | None = None
    reference = (baseline or {}).get("predictions") or {}
    if isinstance(reference, dict) and reference.get("kind") == "class" and reference.get("proportions"):
        proportions = np.asarray(reference["proportions"], dtype=np.float64)
    return Champion(version, error, proportions, labels)


@dataclass
class SourceVerdict:
    """One source's record with the champion, and whether it is quarantined.

    Attributes:
        source: The labeler source.
        labels: Its labelled rows of a classifier (every confidence).
        confident: Labels on the champion's confident predictions.
        disagreements: Confident predictions it labelled as another class.
        agreement: ``1 - disagreements / confident``, or None without confident labels.
        prediction_psi: PSI of the classes the champion predicted for its rows against the
            champion's baseline, or None when it cannot be computed.
        relabels: The most frequent confident relabels: ``predicted``, ``target``,
            ``labels`` and ``rate`` (share of the confident predictions of ``predicted``).
        quarantined: Whether its labels are left out of training, the gate and accuracy.
        reasons: Why, one line each; empty when trusted.
        notes: What a check could not judge (too few labels, drifted predictions).
    """

    source: str
    labels: int = 0
    confident: int = 0
    disagreements: int = 0
    agreement: float | None = None
    prediction_psi: float | None = None
    relabels: list[dict[str, Any]] = field(default_factory=list)
    quarantined: bool = False
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The verdict as JSON-serialisable data (the reports' ``sources`` entries)."""
        return {
            "source": self.source,
            "labels": self.labels,
            "confident_labels": self.confident,
            "disagreements": self.disagreements,
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "prediction_psi": None if self.prediction_psi is None else round(self.prediction_psi, 4),
            "relabels": self.relabels,
            "quarantined": self.quarantined,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
        }


def wilson_lower(successes: int, trials: int, z: float = _Z) -> float:
    """The lower bound of the Wilson score interval of a rate; 0 without trials.

    Example:
        >>> round(wilson_lower(10, 100), 3)
        0.048
    """
    if trials <= 0:
        return 0.0
    p = successes / trials
    z2 = z * z
    centre = p + z2 / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, (centre - spread) / (1 + z2 / trials))


@dataclass
class _Counts:
    """One source's counts: confident confusion (predicted x target) and every prediction by class."""

    confusion: np.ndarray
    predicted: np.ndarray

    @property
    def confident(self) -> int:
        return int(self.confusion.sum())

    @property
    def disagreements(self) -> int:
        return int(self.confusion.sum() - np.trace(self.confusion))


def _counts(stats: Iterable[SourceStat], threshold: int) -> dict[str, _Counts]:
    rows = list(stats)
    if not rows:
        return {}
    n = max(max(r.predicted for r in rows), max(r.target for r in rows)) + 1
    counts: dict[str, _Counts] = {}
    for r in rows:
        if r.predicted < 0 or r.target < 0:
            continue
        c = counts.setdefault(r.source, _Counts(np.zeros((n, n), np.int64), np.zeros(n, np.int64)))
        c.predicted[r.predicted] += r.labels
        if r.confidence >= threshold:
            c.confusion[r.predicted, r.target] += r.labels
    return counts


def assess_sources(
    stats: Iterable[SourceStat], champion: Champion, settings: QuarantineSettings
) -> dict[str, SourceVerdict]:
    """Judges every source that labelled a classifier's predictions.

    The checks and their thresholds are described on
    :class:`~modelloop.monitoring.settings.QuarantineSettings`. With ``enabled`` off, the
    verdicts carry the same figures and the reasons a check found, but no source is
    quarantined.

    Args:
        stats: The store's per-source counts of one model.
        champion: The serving version: its test error and baseline prediction mix.
        settings: The thresholds.

    Returns:
        Source -> verdict, sorted by source.
    """
    threshold = round(settings.confidence * 100)
    counts = _counts(stats, threshold)
    if not counts:
        return {}
    total = np.sum([c.confusion for c in counts.values()], axis=0)
    verdicts: dict[str, SourceVerdict] = {}
    for source in sorted(counts):
        mine = counts[source]
        others = total - mine.confusion
        verdict = _verdict(source, mine, others, champion, settings)
        verdict.quarantined = settings.enabled and bool(verdict.reasons)
        verdicts[source] = verdict
    return verdicts


def _verdict(
    source: str, mine: _Counts, others: np.ndarray, champion: Champion, settings: QuarantineSettings
) -> SourceVerdict:
    n, d = mine.confident, mine.disagreements
    verdict = SourceVerdict(
        source,
        labels=int(mine.predicted.sum()),
        confident=n,
        disagreements=d,
        agreement=None if n == 0 else 1.0 - d / n,
    )
    verdict.relabels = _relabels(mine.confusion, champion)
    if champion.prediction_proportions is not None and verdict.labels:
        reference = champion.prediction_proportions
        width = max(len(reference), len(mine.predicted))
        current = np.pad(mine.predicted, (0, width - len(mine.predicted))) / verdict.labels
        verdict.prediction_psi = psi(np.pad(reference, (0, width - len(reference))), current)
    if n < settings.min_labels:
        verdict.notes.append(f"{n} labels on confident predictions; checks start at {settings.min_labels}")
        return verdict
    rate, low = d / n, wilson_lower(d, n)
    drifted = verdict.prediction_psi is not None and verdict.prediction_psi >= settings.prediction_psi
    if drifted:
        # Under input drift the champion is confidently wrong and an honest labeler says
        # so everywhere: the rate checks would quarantine the labels a retrain needs most.
        verdict.notes.append(
            f"the champion's predictions for its rows drifted (PSI {verdict.prediction_psi:.2f}): "
            "rate checks paused"
        )
    else:
        if champion.error is not None:
            allowance = settings.error_factor * champion.error + settings.label_noise
            if low > allowance:
                verdict.reasons.append(
                    f"disagrees with {rate:.1%} of the champion's confident predictions; its test error "
                    f"({champion.error:.1%}) allows at most {allowance:.1%}"
                )
        n_o = int(others.sum())
        if n_o >= settings.min_labels:
            rate_o = (n_o - int(np.trace(others))) / n_o
            expected = max(settings.relative_factor * rate_o, rate_o + settings.label_noise)
            if low > expected:
                verdict.reasons.append(
                    f"disagrees with {rate:.1%} of the champion's confident predictions; "
                    f"the other sources with {rate_o:.1%}"
                )
    verdict.reasons.extend(_pair_reasons(mine.confusion, others, champion, settings))
    return verdict


def _relabels(confusion: np.ndarray, champion: Champion) -> list[dict[str, Any]]:
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(((int(off[p, t]), p, t) for p, t in zip(*np.nonzero(off), strict=True)), reverse=True)
    result = []
    for count, p, t in pairs[:_TOP_RELABELS]:
        result.append(
            {
                "predicted": champion.name(int(p)),
                "target": champion.name(int(t)),
                "labels": count,
                "rate": round(count / int(confusion[p].sum()), 4),
            }
        )
    return result


def _pair_reasons(
    confusion: np.ndarray, others: np.ndarray, champion: Champion, settings: QuarantineSettings
) -> list[str]:
    reasons = []
    for p, t in zip(*np.nonzero(confusion), strict=True):
        if p == t or confusion[p, t] < settings.min_pair_labels:
            continue
        rate = confusion[p, t] / confusion[p].sum()
        if rate < settings.pair_rate:
            continue
        seen = others[p].sum()
        if seen >= settings.min_pair_labels and others[p, t] / seen >= settings.pair_rate / 2:
            # The other sources relabel that class the same way: the champion is wrong
            # there, not this labeler.
            continue
        reasons.append(
            f"relabels {rate:.0%} of the champion's confident {champion.name(int(p))!r} predictions "
            f"as {champion.name(int(t))!r} ({int(confusion[p, t])} labels)"
        )
    return reasons


class SourceQuarantine:
    """The label checks for ``modelloop retrain``: the same assessment as the server, from the store.

    Args:
        store: The feedback store (its ``source_stats``).
        settings: The thresholds of this model.

    Example:
        >>> screen = SourceQuarantine(store, QuarantineSettings())
        >>> screen.assess("digits", Path("models/digits/3"))["mallory"].quarantined
        True
    """

    def __init__(self, store: SourceCounts, settings: QuarantineSettings) -> None:
        self.store = store
        self.settings = settings

    def assess(self, model: str, version_dir: Path) -> dict[str, SourceVerdict]:
        """Judges the sources of ``model`` against the version in ``version_dir``.

        Raises:
            StoreUnavailable: The store cannot be reached.
        """
        try:
            card: layout.ModelCard | None = layout.read_model_card(version_dir)
        except layout.LayoutError as exc:
            logger.warning("label checks of %s: %s", model, exc)
            card = None
        baseline: dict[str, Any] | None = None
        try:
            loaded = json.loads((version_dir / layout.BASELINE_FILE).read_text(encoding="utf-8"))
            baseline = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            baseline = None
        version = int(version_dir.name) if layout.is_version_name(version_dir.name) else 0
        champion = champion_of(version, card, baseline)
        return assess_sources(self.store.source_stats(model), champion, self.settings)
