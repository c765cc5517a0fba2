"""Alertmanager's webhook (payload version 4) in, retrain decisions out.

Alertmanager POSTs one JSON document per notification
(https://prometheus.io/docs/alerting/latest/configuration/#webhook_config):

```json
{"version": "4", "groupKey": "{}/{action=\\"retrain\\"}:{alertname=\\"ModelDriftDetected\\"}",
 "truncatedAlerts": 0, "status": "firing", "receiver": "modelloop-retrain",
 "groupLabels": {...}, "commonLabels": {...}, "commonAnnotations": {...}, "externalURL": "...",
 "alerts": [{"status": "firing", "labels": {"alertname": "...", "model": "digits", "action": "retrain"},
             "annotations": {...}, "startsAt": "2024-...Z", "endsAt": "0001-...Z",
             "generatorURL": "...", "fingerprint": "..."}]}
```

:func:`parse_alertmanager` checks the shape and returns every alert; :class:`AlertHandler`
applies the :class:`~modelloop.control.retraining.policy.RetrainPolicy` and starts the trigger.
Only alerts labelled ``action="retrain"`` start a retrain, so a latency alert routed here
by mistake never does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelloop.control.retraining.policy import RetrainPolicy
from modelloop.control.retraining.trigger import RetrainTrigger, TriggerError
from modelloop.errors import ModelloopError

logger = logging.getLogger(__name__)

WEBHOOK_VERSION = "4"
RETRAIN_ACTION = "retrain"
_STATUSES = ("firing", "resolved")


class WebhookError(ModelloopError):
    """The webhook payload is not an Alertmanager version 4 notification."""


@dataclass(frozen=True)
class Alert:
    """One alert of a notification.

    Attributes:
        alertname: The rule's name (label ``alertname``).
        model: Label ``model``; None when the alert names no model.
        status: ``firing`` or ``resolved``.
        starts_at: ``startsAt`` as sent (RFC 3339); with the group key, the de-dup key.
        group_key: The notification's ``groupKey``.
        labels: All labels.
        fingerprint: Alertmanager's fingerprint, for the log.
    """

    alertname: str
    model: str | None
    status: str
    starts_at: str
    group_key: str
    labels: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def firing(self) -> bool:
        """Whether the alert is firing."""
        return self.status == "firing"

    @property
    def wants_retrain(self) -> bool:
        """Whether the alert's rule asks for a retrain (label ``action="retrain"``)."""
        return self.labels.get("action") == RETRAIN_ACTION


def _str_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise WebhookError(f"{where} must be an object of string labels")
    return value


def parse_alertmanager(payload: Any) -> list[Alert]:
    """Checks an Alertmanager webhook payload (version "4") and returns its alerts.

    Args:
        payload: The decoded JSON body.

    Returns:
        Every alert, firing and resolved, in payload order.

    Raises:
        WebhookError: Not an object, another version, or a missing or mistyped field;
            the message names the field.

    Example:
        >>> parse_alertmanager({"version": "4", "groupKey": "g", "status": "firing", "alerts": [
        ...     {"status": "firing", "labels": {"alertname": "A", "model": "m"}, "startsAt": "t"}]})[0].model
        'm'
    """
    if not isinstance(payload, dict):
        raise WebhookError("payload must be a JSON object (Alertmanager webhook version 4)")
    version = payload.get("version")
    if version != WEBHOOK_VERSION:
        raise WebhookError(f'unsupported webhook version {version!r}: expected "4"')
    group_key = payload.get("groupKey")
    if not isinstance(group_key, str):
        raise WebhookError('"groupKey" must be a string')
    if payload.get("status") not in _STATUSES:
        raise WebhookError('"status" must be "firing" or "resolved"')
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise WebhookError('"alerts" must be a list')
    parsed: list[Alert] = []
    for i, raw in enumerate(alerts):
        where = f"alerts[{i}]"
        if not isinstance(raw, dict):
            raise WebhookError(f"{where} must be an object")
        status = raw.get("status")
        if status not in _STATUSES:
            raise WebhookError(f'{where}.status must be "firing" or "resolved"')
        labels = _str_map(raw.get("labels"), f"{where}.labels")
        if "alertname" not in labels:
            raise WebhookError(f"{where}.labels lacks alertname")
        starts_at = raw.get("startsAt")
        if not isinstance(starts_at, str) or not starts_at:
            raise WebhookError(f"{where}.startsAt must be a non-empty string")
        fingerprint = raw.get("fingerprint", "")
        parsed.append(
            Alert(
                alertname=labels["alertname"],
                model=labels.get("model"),
                status=status,
                starts_at=starts_at,
                group_key=group_key,
                labels=dict(labels),
                fingerprint=fingerprint if isinstance(fingerprint, str) else "",
            )
        )
    return parsed


@dataclass(frozen=True)
class AlertResult:
    """What the handler did with one alert; the webhook answers with a list of these.

    Attributes:
        alertname: The alert.
        model: The model it names, if any.
        result: ``started``, ``resolved``, ``duplicate``, ``cooldown (N s left)``,
            ``not a retrain alert``, ``no model label``, ``unknown model``,
            ``skipped: <why>`` (no new trusted labels) or ``trigger failed: <why>``.
    """

    alertname: str
    model: str | None
    result: str

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"alertname": self.alertname, "model": self.model, "result": self.result}


class AlertHandler:
    """Applies the retrain policy to parsed alerts and starts the trigger.

    Args:
        policy: De-duplication and cooldown.
        trigger: Starts a retrain.
        model_exists: Whether the repository holds a model of that name.
        on_trigger_failed: Called with the model when the trigger cannot start a run
            (counted as a ``failed`` retrain by the composition root). Defaults to None.
        gate: ``(model, alertname) -> why not`` (None to go on), asked before the policy:
            a drift alert with no new trusted labels starts nothing. Defaults to None.
    """

    def __init__(
        self,
        policy: RetrainPolicy,
        trigger: RetrainTrigger,
        model_exists: Callable[[str], bool],
        *,
        on_trigger_failed: Callable[[str], None] | None = None,
        gate: Callable[[str, str], str | None] | None = None,
    ) -> None:
        self._gate = gate
        self.policy = policy
        self.trigger = trigger
        self._model_exists = model_exists
        self._on_trigger_failed = on_trigger_failed

    async def handle(self, alerts: list[Alert]) -> list[AlertResult]:
        """Decides for every alert, in order, and starts at most one retrain per model.

        Returns:
            One result per alert.
        """
        results: list[AlertResult] = []
        for alert in alerts:
            results.append(AlertResult(alert.alertname, alert.model, await self._handle_one(alert)))
        return results

    async def _handle_one(self, alert: Alert) -> str:
        if not alert.firing:
            return "resolved"
        if not alert.wants_retrain:
            return "not a retrain alert"
        if not alert.model:
            return "no model label"
        if not self._model_exists(alert.model):
            logger.warning("alert %s names unknown model %r: ignored", alert.alertname, alert.model)
            return "unknown model"
        if self._gate is not None and (why := self._gate(alert.model, alert.alertname)):
            return f"skipped: {why}"
        decision = self.policy.should_retrain(
            alert.model, alert.alertname, (alert.group_key, alert.starts_at)
        )
        if not decision:
            return decision.why
        try:
            await self.trigger.start(
                alert.model, reason=alert.alertname, key=f"{alert.group_key}|{alert.starts_at}"
            )
        except TriggerError as exc:
            self.policy.forget(alert.model)
            if self._on_trigger_failed is not None:
                self._on_trigger_failed(alert.model)
            logger.error("retrain of %s could not start: %s", alert.model, exc)
            return f"trigger failed: {exc}"
        logger.info("alert %s (%s) started a retrain of %s", alert.alertname, alert.starts_at, alert.model)
        return "started"
