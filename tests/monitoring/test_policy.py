"""RetrainPolicy: resolved alerts, de-duplication by (groupKey, startsAt), cooldown per model."""

from __future__ import annotations

import pytest

from modelloop.control.retraining.policy import RetrainPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_first_firing_alert_starts(clock: FakeClock):
    policy = RetrainPolicy(60, clock=clock)
    decision = policy.should_retrain("digits", "ModelDriftDetected", ("g", "t0"))
    assert decision and decision.why == "started"


def test_resolved_alert_never_starts(clock: FakeClock):
    policy = RetrainPolicy(0, clock=clock)
    decision = policy.should_retrain("digits", "ModelDriftDetected", ("g", "t0"), resolved=True)
    assert not decision and decision.why == "resolved"
    assert policy.should_retrain("digits", "ModelDriftDetected", ("g", "t0"))  # the firing one still may


def test_same_group_key_and_start_is_a_duplicate_even_after_the_cooldown(clock: FakeClock):
    policy = RetrainPolicy(60, clock=clock)
    assert policy.should_retrain("digits", "A", ("g", "t0"))
    clock.now += 3600  # Alertmanager's repeat_interval re-send
    decision = policy.should_retrain("digits", "A", ("g", "t0"))
    assert not decision and decision.why == "duplicate"
    assert policy.should_retrain("digits", "A", ("g", "t1"))  # a new firing episode


def test_cooldown_per_model(clock: FakeClock):
    policy = RetrainPolicy(60, clock=clock)
    assert policy.should_retrain("digits", "A", ("g1", "t0"))
    clock.now += 30
    decision = policy.should_retrain("digits", "B", ("g2", "t0"))
    assert not decision and decision.why == "cooldown (30 s left)"
    assert policy.should_retrain("iris", "A", ("g3", "t0"))  # another model is not held back
    clock.now += 31
    assert policy.should_retrain("digits", "B", ("g4", "t0"))


def test_alert_seen_during_the_cooldown_is_not_started_later(clock: FakeClock):
    policy = RetrainPolicy(60, clock=clock)
    assert policy.should_retrain("digits", "A", ("g1", "t0"))
    assert not policy.should_retrain("digits", "B", ("g2", "t0"))
    clock.now += 120
    assert policy.should_retrain("digits", "B", ("g2", "t0")).why == "duplicate"


def test_keyless_calls_rely_on_the_cooldown(clock: FakeClock):
    policy = RetrainPolicy(60, clock=clock)
    assert policy.should_retrain("digits", "inprocess:drift")
    assert not policy.should_retrain("digits", "inprocess:drift")
    clock.now += 60
    assert policy.should_retrain("digits", "inprocess:drift")


def test_per_model_cooldown_and_forget(clock: FakeClock):
    policy = RetrainPolicy(900, cooldown_for=lambda m: 10.0 if m == "fast" else None, clock=clock)
    assert policy.cooldown("fast") == 10 and policy.cooldown("slow") == 900
    assert policy.should_retrain("fast", "A")
    clock.now += 11
    assert policy.should_retrain("fast", "A")
    assert not policy.should_retrain("fast", "A")
    policy.forget("fast")  # the trigger could not start: no cooldown for a run that never ran
    assert policy.should_retrain("fast", "A")


def test_remembered_keys_are_bounded(clock: FakeClock):
    policy = RetrainPolicy(0, clock=clock, max_keys=2)
    for i in range(3):
        assert policy.should_retrain("m", "A", ("g", str(i)))
    assert policy.should_retrain("m", "A", ("g", "0"))  # the oldest key was forgotten
    assert not policy.should_retrain("m", "A", ("g", "2"))


def test_negative_cooldown_is_refused():
    with pytest.raises(ValueError, match="cooldown_s"):
        RetrainPolicy(-1)


def test_processes_sharing_a_ledger_start_one_retrain(clock: FakeClock, tmp_path):
    # Two policies over one ledger file stand for two worker processes of one server.
    ledger = tmp_path / "state" / "retrain-policy.json"
    first = RetrainPolicy(60, clock=clock, ledger=ledger)
    second = RetrainPolicy(60, clock=clock, ledger=ledger)
    assert first.should_retrain("digits", "A", ("g", "t0"))
    assert second.should_retrain("digits", "A", ("g", "t0")).why == "duplicate"
    assert second.should_retrain("digits", "inprocess", None).why.startswith("cooldown")
    second.forget("digits")  # the retrain could not start: the cooldown lifts for both
    assert first.should_retrain("digits", "inprocess", None)
    clock.now += 61
    assert second.should_retrain("digits", "B", ("g", "t1"))
    assert first.should_retrain("digits", "B", ("g", "t1")).why == "duplicate"
    # A fresh process (a restarted worker) reads what the others decided.
    assert (
        RetrainPolicy(60, clock=clock, ledger=ledger).should_retrain("digits", "A", ("g", "t0")).why
        == "duplicate"
    )
