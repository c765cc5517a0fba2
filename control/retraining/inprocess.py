"""The retrain alert rules, evaluated in-process when no Alertmanager is configured.

They mirror the ``action: retrain`` rules of ``monitoring/rules/modelloop.rules.yml``, so
``modelloop up`` closes the loop without Prometheus:

- ``ModelDriftDetected``: the version's window has drifted (``drift.drifted``) in every
  evaluation for at least ``drift_for_s`` (the rule's ``for: 1m``).
- ``ModelPredictionDrift``: the PSI of the window's predictions is at least
  :data:`~modelloop.monitoring.drift.PREDICTION_DRIFT_THRESHOLD` in every evaluation for
  at least ``prediction_drift_for_s`` (the rule's ``for: 5m``).
- ``ModelAccuracyBelowFloor``: a classifier's accuracy over its recent labels is below
  the model's ``accuracy_floor`` (``config.json`` ``"drift"`` key, or the server's), with
  at least ``min_labels`` labels, for at least ``accuracy_for_s`` (the rule's ``for: 2m``).

A firing rule goes through the same :class:`~modelloop.control.retraining.policy.RetrainPolicy`
(cooldown per model) and :class:`~modelloop.control.retraining.trigger.RetrainTrigger` as the
webhook. Register an instance with ``MonitoringService.add_listener``.

Example:

```python
rules = InProcessRules(policy, trigger)
service.add_listener(rules)
```
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from modelloop.control.retraining.policy import RetrainPolicy
from modelloop.control.retraining.trigger import RetrainTrigger, TriggerError
from modelloop.monitoring.drift import PREDICTION_DRIFT_THRESHOLD

if TYPE_CHECKING:
    from modelloop.monitoring.report import EvaluationReport

logger = logging.getLogger(__name__)

DRIFT_RULE = "ModelDriftDetected"
ACCURACY_RULE = "ModelAccuracyBelowFloor"
PREDICTION_DRIFT_RULE = "ModelPredictionDrift"


class InProcessRules:
    """A ``MonitoringService`` listener that starts retrains on sustained drift or low accuracy.

    The rules are checked in the order drift, accuracy, prediction drift; the first that
    holds names the retrain.

    Args:
        policy: Cooldown per model (shared with the webhook).
        trigger: Starts the retrain.
        drift_for_s: How long drift must last before the rule fires. Defaults to 60.
        accuracy_for_s: How long accuracy must stay below the floor. Defaults to 120.
        prediction_drift_for_s: How long prediction drift must last. Defaults to 300.
        on_trigger_failed: Called with the model when the trigger cannot start a run.
            Defaults to None.
        clock: Monotonic clock. Defaults to ``time.monotonic``.
        gate: ``(model, reason) -> why not`` (None to go on), asked before the policy.
            Defaults to None.
    """

    def __init__(
        self,
        policy: RetrainPolicy,
        trigger: RetrainTrigger,
        *,
        drift_for_s: float = 60.0,
        accuracy_for_s: float = 120.0,
        prediction_drift_for_s: float = 300.0,
        on_trigger_failed: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        gate: Callable[[str, str], str | None] | None = None,
    ) -> None:
        self._gate = gate
        self.policy = policy
        self.trigger = trigger
        self.drift_for_s = drift_for_s
        self.accuracy_for_s = accuracy_for_s
        self.prediction_drift_for_s = prediction_drift_for_s
        self._on_trigger_failed = on_trigger_failed
        self._clock = clock
        # (rule, model, version) -> when the condition was first seen true (the "pending" state).
        self._pending: dict[tuple[str, str, int], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, model: str, version: int, report: EvaluationReport) -> None:
        """Evaluates the rules on one report; fires at most one retrain per call."""
        drifted = report.drift is not None and report.drift.drifted
        psi = report.drift.prediction_psi if report.drift is not None else None
        predictions_drifted = psi is not None and psi >= PREDICTION_DRIFT_THRESHOLD
        floor = report.settings.accuracy_floor
        accuracy = report.accuracy
        low = (
            report.task != "regression"
            and floor is not None
            and accuracy is not None
            and accuracy.ready
            and accuracy.value is not None
            and (report.labels or 0) >= report.settings.min_labels
            and accuracy.value < floor
        )
        fired = [
            rule
            for rule, active, hold in (
                (DRIFT_RULE, drifted, self.drift_for_s),
                (ACCURACY_RULE, low, self.accuracy_for_s),
                (PREDICTION_DRIFT_RULE, predictions_drifted, self.prediction_drift_for_s),
            )
            if self._holds(rule, model, version, active, hold)
        ]
        if fired:
            self._fire(model, fired[0])

    def _holds(self, rule: str, model: str, version: int, active: bool, hold_s: float) -> bool:
        key = (rule, model, version)
        if not active:
            self._pending.pop(key, None)
            return False
        since = self._pending.setdefault(key, self._clock())
        return self._clock() - since >= hold_s

    def _fire(self, model: str, rule: str) -> None:
        if self._gate is not None and self._gate(model, f"inprocess:{rule}"):
            return
        decision = self.policy.should_retrain(model, f"inprocess:{rule}")
        if not decision:
            logger.debug("in-process rule %s for %s: %s", rule, model, decision.why)
            return
        logger.info("in-process rule %s fired for %s: starting a retrain", rule, model)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # evaluate_once() called outside the loop (tests, scripts): run the start here.
            asyncio.run(self._start(model, rule))
            return
        task = loop.create_task(self._start(model, rule), name=f"inprocess-retrain-{model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, model: str, rule: str) -> None:
        try:
            await self.trigger.start(model, reason=rule)
        except TriggerError as exc:
            self.policy.forget(model)
            if self._on_trigger_failed is not None:
                self._on_trigger_failed(model)
            logger.error("in-process rule %s: retrain of %s could not start: %s", rule, model, exc)
