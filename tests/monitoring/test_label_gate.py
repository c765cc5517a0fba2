"""A drift alert starts a retrain only when trusted labels arrived since the last retrain: without
them a retrain could learn nothing about the drifted inputs (it would publish what it had)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelloop.control.retraining.policy import NewLabelsGate, RetrainPolicy
from modelloop.control.retraining.trigger import DryRunTrigger
from modelloop.control.retraining.webhook import AlertHandler, parse_alertmanager
from modelloop.monitoring.stores import Stores, open_stores
from modelloop.monitoring.stores.records import FeedbackItem, PredictionRecord

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Stores]:
    s = open_stores(f"sqlite:///{tmp_path / 'state' / 'modelloop.db'}")
    try:
        yield s
    finally:
        s.close()


def _alert(starts_at: str, name: str = "ModelDriftDetected") -> Any:
    payload = json.loads((TESTDATA / "alertmanager-firing.json").read_text())
    for alert in payload["alerts"]:
        alert["startsAt"] = starts_at
        alert["labels"]["alertname"] = name
    payload["commonLabels"]["alertname"] = name
    return parse_alertmanager(payload)


def _predict(store: Stores, rid: str) -> None:
    store.predictions.record(
        [PredictionRecord(rid, "digits", 1, time.time(), [[1.0]], [[0.9, 0.1]], [0], input_hash=rid)]
    )


async def test_a_drift_alert_without_new_trusted_labels_starts_no_retrain(store: Stores) -> None:
    skipped: list[tuple[str, str]] = []
    quarantined = {"mallory"}
    gate = NewLabelsGate(
        store.feedback, store.retrains, lambda model: quarantined, on_skip=lambda m, r: skipped.append((m, r))
    )
    trigger = DryRunTrigger()
    handler = AlertHandler(RetrainPolicy(0), trigger, lambda m: m == "digits", gate=gate.check)

    # Predictions alone (no labels at all): the alert is turned away, counted and explained.
    _predict(store, "a")
    results = await handler.handle(_alert("2026-01-01T00:00:00Z"))
    assert results[0].result.startswith("skipped: no new trusted labels") and trigger.calls == []
    assert skipped == [("digits", "ModelDriftDetected")]
    assert "no new trusted labels" in gate.skipped["digits"].why
    # A quarantined source's labels are not new trusted labels either.
    store.feedback.add_feedback("digits", [FeedbackItem("a", [1])], source="mallory", quarantined=True)
    results = await handler.handle(_alert("2026-01-01T00:01:00Z"))
    assert results[0].result.startswith("skipped:") and trigger.calls == []
    # A trusted label arrives: the next drift alert retrains.
    _predict(store, "b")
    store.feedback.add_feedback("digits", [FeedbackItem("b", [0])], source="alice")
    results = await handler.handle(_alert("2026-01-01T00:02:00Z"))
    assert results[0].result == "started" and len(trigger.calls) == 1
    # The retrain kept its report: labels before it are no longer new.
    store.retrains.record_retrain("digits", "run-1", "blessed", {"run_id": "run-1"})
    results = await handler.handle(_alert("2026-01-01T00:03:00Z", "ModelPredictionDrift"))
    assert results[0].result.startswith("skipped: no new trusted labels since the last retrain")
    assert len(trigger.calls) == 1 and len(skipped) == 3


def test_every_drift_rule_is_gated_in_process_too(store: Stores) -> None:
    from modelloop.control.retraining.inprocess import DRIFT_RULE, PREDICTION_DRIFT_RULE

    gate = NewLabelsGate(store.feedback, store.retrains, lambda model: set())
    for rule in (DRIFT_RULE, PREDICTION_DRIFT_RULE):
        assert gate.check("digits", f"inprocess:{rule}") is not None
        assert gate.check("digits", rule) is not None


async def test_an_accuracy_alert_is_never_held_back_by_the_label_gate(store: Stores) -> None:
    gate = NewLabelsGate(store.feedback, store.retrains, lambda model: set())
    trigger = DryRunTrigger()
    handler = AlertHandler(RetrainPolicy(0), trigger, lambda m: m == "digits", gate=gate.check)
    results = await handler.handle(_alert("2026-01-01T00:00:00Z", "ModelAccuracyBelowFloor"))
    assert results[0].result == "started" and gate.skipped == {}
