"""Alertmanager webhook payloads (version 4) and the alert handler, against golden payloads."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from modelloop.control.retraining.policy import RetrainPolicy
from modelloop.control.retraining.trigger import DryRunTrigger
from modelloop.control.retraining.webhook import AlertHandler, WebhookError, parse_alertmanager

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"


def golden(name: str) -> dict[str, Any]:
    return json.loads((TESTDATA / f"alertmanager-{name}.json").read_text())


def handler(trigger: DryRunTrigger, failed: list[str] | None = None) -> AlertHandler:
    return AlertHandler(
        RetrainPolicy(900),
        trigger,
        model_exists=lambda m: m == "digits",
        on_trigger_failed=None if failed is None else failed.append,
    )


def test_parse_firing():
    (alert,) = parse_alertmanager(golden("firing"))
    assert alert.alertname == "ModelDriftDetected" and alert.model == "digits"
    assert alert.firing and alert.wants_retrain
    assert alert.starts_at == "2026-01-12T10:15:30.123Z"
    assert alert.group_key.startswith("{}/{action=")
    assert alert.labels["version"] == "1" and alert.fingerprint == "5c1a0b6f2d3e4a71"


def test_parse_resolved():
    (alert,) = parse_alertmanager(golden("resolved"))
    assert alert.status == "resolved" and not alert.firing


def test_parse_malformed_names_the_field():
    with pytest.raises(WebhookError, match=r"alerts\[0\]\.startsAt must be a non-empty string"):
        parse_alertmanager(golden("malformed"))


def _mutate(path: list[Any], value: Any) -> dict[str, Any]:
    payload = copy.deepcopy(golden("firing"))
    target = payload
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return payload


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "must be a JSON object"),
        (_mutate(["version"], "3"), "unsupported webhook version '3'"),
        (_mutate(["version"], KeyError), "unsupported webhook version None"),
        (_mutate(["groupKey"], 5), '"groupKey" must be a string'),
        (_mutate(["status"], "pending"), '"status" must be'),
        (_mutate(["alerts"], {}), '"alerts" must be a list'),
        (_mutate(["alerts", 0], "x"), r"alerts\[0\] must be an object"),
        (_mutate(["alerts", 0, "status"], "x"), r"alerts\[0\]\.status"),
        (_mutate(["alerts", 0, "labels"], {"alertname": 1}), r"alerts\[0\]\.labels must be"),
        (_mutate(["alerts", 0, "labels"], {"model": "digits"}), "lacks alertname"),
    ],
)
def test_parse_rejects(payload: Any, message: str):
    with pytest.raises(WebhookError, match=message):
        parse_alertmanager(payload)


async def test_handler_starts_once_and_deduplicates():
    trigger = DryRunTrigger()
    h = handler(trigger)
    alerts = parse_alertmanager(golden("firing"))
    assert [r.result for r in await h.handle(alerts)] == ["started"]
    # Alertmanager re-sends the same group every repeat_interval.
    assert [r.result for r in await h.handle(alerts)] == ["duplicate"]
    assert trigger.calls == [("digits", "ModelDriftDetected", f"{alerts[0].group_key}|{alerts[0].starts_at}")]


async def test_handler_cooldown_for_a_new_episode():
    trigger = DryRunTrigger()
    h = handler(trigger)
    await h.handle(parse_alertmanager(golden("firing")))
    later = golden("firing")
    later["alerts"][0]["startsAt"] = "2026-01-12T10:20:00Z"
    (result,) = await h.handle(parse_alertmanager(later))
    assert result.result.startswith("cooldown (")
    assert len(trigger.calls) == 1


async def test_handler_ignores_resolved_unknown_and_non_retrain_alerts():
    trigger = DryRunTrigger()
    h = handler(trigger)
    assert [r.result for r in await h.handle(parse_alertmanager(golden("resolved")))] == ["resolved"]
    results = await h.handle(parse_alertmanager(golden("unknown-model")))
    assert [r.as_dict() for r in results] == [
        {"alertname": "ModelDriftDetected", "model": "no-such-model", "result": "unknown model"}
    ]
    latency = _mutate(["alerts", 0, "labels"], {"alertname": "ModelHighLatencyP99", "model": "digits"})
    assert [r.result for r in await h.handle(parse_alertmanager(latency))] == ["not a retrain alert"]
    nameless = _mutate(["alerts", 0, "labels"], {"alertname": "X", "action": "retrain"})
    assert [r.result for r in await h.handle(parse_alertmanager(nameless))] == ["no model label"]
    assert trigger.calls == []


async def test_handler_trigger_failure_is_reported_counted_and_lifts_the_cooldown():
    failed: list[str] = []
    trigger = DryRunTrigger(error="cluster unreachable")
    h = handler(trigger, failed)
    (result,) = await h.handle(parse_alertmanager(golden("firing")))
    assert result.result == "trigger failed: cluster unreachable"
    assert failed == ["digits"]
    trigger.error = None
    later = golden("firing")
    later["alerts"][0]["startsAt"] = "2026-01-12T11:00:00Z"
    assert [r.result for r in await h.handle(parse_alertmanager(later))] == ["started"]
