"""The label checks of every model's labeler sources, and their verdicts until the next check.

Each evaluation pass checks a model's sources against its champion (the latest available
version; :mod:`~modelloop.monitoring.quarantine` holds the checks themselves). The verdicts
stay in force until the next pass: accuracy, the feedback route and the retrain leave out
the sources quarantined here. A store that cannot be read keeps the previous verdicts.
"""

from __future__ import annotations

import logging
from typing import Any

from modelloop.errors import ServiceError
from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.quarantine import Champion, SourceVerdict, assess_sources
from modelloop.monitoring.settings import QuarantineSettings, resolve_quarantine
from modelloop.monitoring.stores import StoreUnavailable
from modelloop.monitoring.stores.feedback import FeedbackStore
from modelloop.serving.types import ModelCatalog

logger = logging.getLogger(__name__)


class LabelChecks:
    """Runs the label checks and keeps each model's latest verdicts.

    Args:
        defaults: The server's checks (``MonitoringSettings.quarantine``), under each model's
            ``"feedback"`` section of ``config.json``.
        catalog: Where a model's ``config.json`` options come from.
        feedback: The labels and their per-source counts.
        metrics: Where ``modelloop_feedback_source_quarantined`` and
            ``modelloop_feedback_source_agreement`` go.
    """

    def __init__(
        self,
        defaults: QuarantineSettings,
        *,
        catalog: ModelCatalog,
        feedback: FeedbackStore,
        metrics: MonitoringMetrics,
    ) -> None:
        self.defaults = defaults
        self.catalog = catalog
        self.feedback = feedback
        self.metrics = metrics
        # Model -> source -> the latest verdict (read by the feedback route).
        self._verdicts: dict[str, dict[str, SourceVerdict]] = {}
        self._champions: dict[str, int] = {}
        self._bad_config: dict[str, str] = {}

    def settings_for(self, model: str) -> QuarantineSettings:
        """The checks of one model: its ``"feedback"`` section over the server's (logged once if invalid)."""
        try:
            return resolve_quarantine(self.defaults, self.catalog.model_options(model, "feedback"))
        except ValueError as exc:
            if self._bad_config.get(model) != str(exc):
                logger.error("model %s: config.json %s; using the server's label checks", model, exc)
                self._bad_config[model] = str(exc)
            return self.defaults
        except ServiceError:
            return self.defaults

    def assess(self, model: str, version: int, champion: Champion) -> dict[str, SourceVerdict]:
        """Checks a model's sources against its champion and keeps the verdicts.

        Updates the two gauges and logs every change of a source's quarantine.

        Args:
            model: Model name.
            version: The champion's version.
            champion: What the checks compare labels with (its confusion and confidence).

        Returns:
            Source -> verdict (the previous ones when the store cannot be read).
        """
        try:
            stats = self.feedback.source_stats(model)
        except StoreUnavailable as exc:
            logger.warning("label checks of %s skipped: %s", model, exc.message)
            return self._verdicts.get(model, {})
        verdicts = assess_sources(stats, champion, self.settings_for(model))
        before = self._verdicts.get(model, {})
        for source, verdict in verdicts.items():
            self.metrics.source_quarantined.labels(model, source).set(1 if verdict.quarantined else 0)
            if verdict.agreement is not None:
                self.metrics.source_agreement.labels(model, source).set(verdict.agreement)
            was = before.get(source)
            if verdict.quarantined and (was is None or not was.quarantined):
                logger.warning(
                    "model %s: labeler source %r quarantined: %s", model, source, "; ".join(verdict.reasons)
                )
            elif not verdict.quarantined and was is not None and was.quarantined:
                logger.warning("model %s: labeler source %r is no longer quarantined", model, source)
        self._verdicts[model] = verdicts
        self._champions[model] = version
        return verdicts

    def quarantined(self, model: str) -> set[str]:
        """The sources of a model quarantined at the last check."""
        return {s for s, v in self._verdicts.get(model, {}).items() if v.quarantined}

    def quarantine_reasons(self, model: str) -> dict[str, list[str]]:
        """Each quarantined source of a model with the reasons of the last check."""
        return {s: list(v.reasons) for s, v in self._verdicts.get(model, {}).items() if v.quarantined}

    def report(self, model: str) -> dict[str, Any]:
        """Every labeler source of a model: its labels, agreement, confusion and quarantine.

        Raises:
            StoreUnavailable: The store cannot be reached.
        """
        counts = self.feedback.label_sources(model)
        verdicts = self._verdicts.get(model, {})
        sources = []
        for source in sorted(set(counts) | set(verdicts)):
            verdict = verdicts.get(source, SourceVerdict(source))
            entry = verdict.as_dict()
            labelled = counts.get(source)
            entry["stored_labels"] = labelled.labels if labelled else 0
            entry["stored_requests"] = labelled.requests if labelled else 0
            entry["labels_while_quarantined"] = labelled.quarantined_labels if labelled else 0
            sources.append(entry)
        return {
            "model": model,
            "champion_version": self._champions.get(model),
            "checks": self.settings_for(model).model_dump(),
            "sources": sources,
        }
