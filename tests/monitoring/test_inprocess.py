"""In-process retrain rules: sustained drift or low accuracy go through the policy to the trigger."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from modelloop.control.retraining.inprocess import InProcessRules
from modelloop.control.retraining.policy import RetrainPolicy
from modelloop.control.retraining.trigger import DryRunTrigger
from modelloop.monitoring.settings import MonitoringSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def report(
    *,
    drifted=False,
    accuracy=None,
    labels=0,
    floor=None,
    task="multiclass",
    min_labels=50,
    prediction_psi=None,
):
    acc = None
    if accuracy is not None:
        acc = SimpleNamespace(metric="accuracy", value=accuracy, rows=labels, ready=labels >= min_labels)
    return SimpleNamespace(
        task=task,
        drift=SimpleNamespace(drifted=drifted, prediction_psi=prediction_psi),
        accuracy=acc,
        labels=labels,
        settings=MonitoringSettings(accuracy_floor=floor, min_labels=min_labels),
    )


def rules(clock: FakeClock, trigger: DryRunTrigger, failed: list[str] | None = None) -> InProcessRules:
    return InProcessRules(
        RetrainPolicy(900, clock=clock),
        trigger,
        drift_for_s=60,
        accuracy_for_s=120,
        clock=clock,
        on_trigger_failed=None if failed is None else failed.append,
    )


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_drift_fires_only_after_it_lasted_and_then_cools_down():
    clock, trigger = FakeClock(), DryRunTrigger()
    r = rules(clock, trigger)
    r("digits", 1, report(drifted=True))
    clock.now = 59
    r("digits", 1, report(drifted=True))
    await settle()
    assert trigger.calls == []
    clock.now = 60
    r("digits", 1, report(drifted=True))
    await settle()
    assert trigger.calls == [("digits", "ModelDriftDetected", "")]
    clock.now = 200
    r("digits", 1, report(drifted=True))  # still drifted, but within the cooldown
    await settle()
    assert len(trigger.calls) == 1


async def test_prediction_drift_fires_after_five_minutes_at_or_above_the_threshold():
    clock, trigger = FakeClock(), DryRunTrigger()
    r = rules(clock, trigger)
    r("digits", 1, report(prediction_psi=0.24))  # normal traffic: under 0.25, never pending
    clock.now = 400
    r("digits", 1, report(prediction_psi=4.0))  # a change in the mix of classes starts here
    clock.now = 699
    r("digits", 1, report(prediction_psi=0.25))
    await settle()
    assert trigger.calls == []
    clock.now = 700
    r("digits", 1, report(prediction_psi=3.9))
    await settle()
    assert trigger.calls == [("digits", "ModelPredictionDrift", "")]


async def test_input_drift_names_the_retrain_when_both_drifts_hold():
    clock, trigger = FakeClock(), DryRunTrigger()
    r = rules(clock, trigger)
    r("digits", 1, report(drifted=True, prediction_psi=4.0))
    clock.now = 400
    r("digits", 1, report(drifted=True, prediction_psi=4.0))
    await settle()
    assert trigger.calls == [("digits", "ModelDriftDetected", "")]


async def test_a_quiet_evaluation_resets_the_pending_drift():
    clock, trigger = FakeClock(), DryRunTrigger()
    r = rules(clock, trigger)
    r("digits", 1, report(drifted=True))
    clock.now = 40
    r("digits", 1, report(drifted=False))
    clock.now = 70
    r("digits", 1, report(drifted=True))
    await settle()
    assert trigger.calls == []
    r("digits", 1, SimpleNamespace(**{**vars(report()), "drift": None}))  # no verdict yet: resets too


async def test_accuracy_below_floor_needs_enough_labels_and_time():
    clock, trigger = FakeClock(), DryRunTrigger()
    r = rules(clock, trigger)
    r("digits", 1, report(accuracy=0.5, labels=10, floor=0.8, min_labels=50))  # too few labels
    clock.now = 500
    r("digits", 1, report(accuracy=0.5, labels=10, floor=0.8, min_labels=50))
    r("digits", 1, report(accuracy=0.5, labels=60, floor=None))  # no floor configured
    r("digits", 1, report(accuracy=0.9, labels=60, floor=0.8))  # above the floor
    r("diabetes", 1, report(accuracy=30.0, labels=60, floor=0.8, task="regression"))
    await settle()
    assert trigger.calls == []
    r("digits", 1, report(accuracy=0.5, labels=60, floor=0.8))
    clock.now = 620
    r("digits", 1, report(accuracy=0.5, labels=60, floor=0.8))
    await settle()
    assert trigger.calls == [("digits", "ModelAccuracyBelowFloor", "")]


async def test_trigger_failure_is_counted_and_lifts_the_cooldown():
    clock, failed = FakeClock(), []
    trigger = DryRunTrigger(error="busy")
    r = rules(clock, trigger, failed)
    r("digits", 1, report(drifted=True))
    clock.now = 60
    r("digits", 1, report(drifted=True))
    await settle()
    assert failed == ["digits"]
    trigger.error = None
    r("digits", 1, report(drifted=True))
    await settle()
    assert trigger.calls == [("digits", "ModelDriftDetected", "")]


def test_outside_an_event_loop_the_start_runs_inline():
    clock, trigger = FakeClock(), DryRunTrigger()
    r = InProcessRules(RetrainPolicy(0, clock=clock), trigger, drift_for_s=0, clock=clock)
    r("digits", 1, report(drifted=True))
    assert trigger.calls == [("digits", "ModelDriftDetected", "")]


def test_the_drift_rules_hold_comes_from_the_settings(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry

    from modelloop.control.retraining.wiring import build_retraining
    from modelloop.control.service import MonitoringService
    from tests.monitoring.monhelpers import FakeCatalog

    def built(settings: MonitoringSettings) -> InProcessRules:
        service = MonitoringService(
            settings, repo=tmp_path / "repo", catalog=FakeCatalog({}), registry=CollectorRegistry()
        )
        try:
            retraining = build_retraining(settings, tmp_path / "repo", service)
            assert retraining.rules is not None
            return retraining.rules
        finally:
            service.stores.close()

    assert built(MonitoringSettings(state_dir=tmp_path / "a", trigger="none")).drift_for_s == 60
    monkeypatch.setenv("MODELLOOP_MONITORING_DRIFT_FOR_S", "5")
    assert built(MonitoringSettings(state_dir=tmp_path / "b", trigger="none")).drift_for_s == 5
