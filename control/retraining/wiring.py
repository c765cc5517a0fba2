"""The retraining half of the loop, assembled for the composition root.

One :class:`RetrainPolicy` and one trigger serve both the Alertmanager webhook
(``POST /monitoring/alerts``) and, when no Alertmanager is configured, the in-process
rules. The server counts every run it launched in ``modelloop_retrain_runs_total``:
subprocess runs by their outcome when the child exits, and any launch that failed as
``failed``.

Example:

```python
retraining = build_retraining(monitoring_settings, repo, service)
app = create_app(..., alerts=retraining.alerts)
...
await retraining.close()
```
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelloop.control.retraining.inprocess import InProcessRules
from modelloop.control.retraining.policy import NewLabelsGate, RetrainPolicy
from modelloop.control.retraining.trigger import (
    DryRunTrigger,
    KubernetesJobSettings,
    KubernetesJobTrigger,
    RetrainRun,
    RetrainTrigger,
    SubprocessTrigger,
)
from modelloop.control.retraining.webhook import AlertHandler
from modelloop.errors import ServiceError
from modelloop.monitoring.settings import MonitoringSettings, resolve_model_settings

if TYPE_CHECKING:
    from modelloop.control.service import MonitoringService

logger = logging.getLogger(__name__)


@dataclass
class Retraining:
    """The policy, trigger, webhook handler and (optional) in-process rules of one server.

    Attributes:
        policy: De-duplication and cooldown, shared by both paths.
        trigger: How a retrain is launched.
        alerts: The webhook's handler (for ``create_app(alerts=...)``).
        rules: The in-process rules, registered on the service; None when Alertmanager
            is in charge.
    """

    policy: RetrainPolicy
    trigger: RetrainTrigger
    alerts: AlertHandler
    rules: InProcessRules | None

    async def close(self) -> None:
        """Stops retrain children that are still running (they publish nothing)."""
        if isinstance(self.trigger, SubprocessTrigger):
            await self.trigger.close()


def _make_trigger(settings: MonitoringSettings, repo: Path, on_finish: Any) -> RetrainTrigger:
    if settings.trigger == "subprocess":
        return SubprocessTrigger(
            repo, store_url=settings.resolved_store_url(), state_dir=settings.state_dir, on_finish=on_finish
        )
    if settings.trigger == "kubernetes":
        from kubernetes import client, config

        job = KubernetesJobSettings()
        config.load_incluster_config()
        return KubernetesJobTrigger(
            client.BatchV1Api(), job.template, job.resolved_namespace(), image=job.image
        )
    return DryRunTrigger()


POLICY_LEDGER = "retrain-policy.json"
"""The file under ``state_dir`` where the workers of one server share their retrain policy."""


def build_retraining(
    settings: MonitoringSettings,
    repo: Path,
    service: MonitoringService,
    *,
    shared: bool = False,
    rules: bool = True,
) -> Retraining:
    """Builds the retraining half and registers the in-process rules on ``service``.

    Args:
        settings: Server-wide monitoring settings (``trigger``, ``retrain_cooldown_s``,
            ``alertmanager_url``, ``state_dir``, ``store_url``).
        repo: The model repository the retrains publish into.
        service: The monitoring service: its metrics count the runs, its catalog says
            which models exist, and it calls the in-process rules.
        shared: Several worker processes serve together: the policy's starts and alert
            keys go through a ledger under ``state_dir``, so an alert or a rule starts one
            retrain, not one per worker. Defaults to False.
        rules: Whether this process runs the in-process rules (one worker does).
            Defaults to True.

    Returns:
        The assembled parts.
    """
    runs = service.metrics.retrain_runs

    def count(run: RetrainRun) -> None:
        runs.labels(model=run.model, outcome=run.outcome).inc()

    def count_failed_launch(model: str) -> None:
        runs.labels(model=model, outcome="failed").inc()

    def cooldown_for(model: str) -> float | None:
        try:
            overrides = service.catalog.model_options(model, "drift")
            return resolve_model_settings(settings, overrides).retrain_cooldown_s
        except (ValueError, ServiceError):  # a broken config.json or a vanished model
            return None

    policy = (
        RetrainPolicy(
            settings.retrain_cooldown_s,
            cooldown_for=cooldown_for,
            # Wall-clock time: the workers share it, and the ledger outlives a restart.
            clock=time.time,
            ledger=settings.state_dir / POLICY_LEDGER,
        )
        if shared
        else RetrainPolicy(settings.retrain_cooldown_s, cooldown_for=cooldown_for)
    )
    trigger = _make_trigger(settings, repo, count)
    skipped = service.metrics.retrain_skipped
    gate = NewLabelsGate(
        service.stores.feedback,
        service.stores.retrains,
        service.quarantined_sources,
        on_skip=lambda model, reason: skipped.labels(model=model, reason=reason).inc(),
    )
    service.retrain_gate = gate
    alerts = AlertHandler(
        policy, trigger, service.has_model, on_trigger_failed=count_failed_launch, gate=gate.check
    )
    in_process: InProcessRules | None = None
    if settings.alertmanager_url is None and rules:
        in_process = InProcessRules(
            policy,
            trigger,
            on_trigger_failed=count_failed_launch,
            gate=gate.check,
            drift_for_s=settings.drift_for_s,
        )
        service.add_listener(in_process)
    where = (
        f"Alertmanager at {settings.alertmanager_url}"
        if settings.alertmanager_url is not None
        else ("in-process" if in_process is not None else "in-process, in another worker")
    )
    logger.info(
        "retraining: trigger %s, rules %s, cooldown %.0f s",
        settings.trigger,
        where,
        settings.retrain_cooldown_s,
    )
    return Retraining(policy=policy, trigger=trigger, alerts=alerts, rules=in_process)
