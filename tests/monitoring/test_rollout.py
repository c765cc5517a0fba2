"""The rollout controller: bounds, verdicts, and the state shared through one store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from modelloop.control.rollout.controller import RolloutController
from modelloop.control.rollout.guardrails import (
    VersionEvidence,
    difference_bounds,
    judge,
    latency_bucket,
    latency_quantile,
    wilson_interval,
)
from modelloop.control.rollout.http import RolloutPart
from modelloop.errors import ErrorCode, ServiceError
from modelloop.monitoring.stores import open_stores
from modelloop.monitoring.stores.records import PredictionRecord
from modelloop.serving.types import ModelState, RolloutPolicy, VersionStatus

POLICY = RolloutPolicy(
    mode="canary", steps=[10, 50, 100], step_min_requests=30, min_labels=20, max_accuracy_drop=0.1
)


def test_wilson_and_newcombe_bounds() -> None:
    low, high = wilson_interval(19, 20, 1.959964)
    assert low == pytest.approx(0.7639, abs=1e-3) and high == pytest.approx(0.9911, abs=1e-3)
    # Newcombe (1998), method 10, example (a): 56/70 vs 48/80, two-sided 95 %: 0.0524 .. 0.3339.
    lower, upper = difference_bounds(56, 70, 48, 80, 0.975)
    assert lower == pytest.approx(0.0524, abs=1e-3) and upper == pytest.approx(0.3339, abs=1e-3)


def test_latency_histogram_quantile() -> None:
    buckets: dict[int, int] = {}
    for ms in [1.0] * 98 + [10.0, 10.0]:
        b = latency_bucket(ms / 1000)
        buckets[b] = buckets.get(b, 0) + 1
    assert latency_quantile(buckets, 0.5) == pytest.approx(0.001, rel=0.11)
    assert latency_quantile(buckets, 0.99) == pytest.approx(0.010, rel=0.11)


def evidence(
    requests: int, errors: int = 0, correct: int = 0, labelled: int = 0, ms: float = 1.0
) -> VersionEvidence:
    return VersionEvidence(
        requests=requests,
        errors=errors,
        step_requests=requests,
        latency={latency_bucket(ms / 1000): requests},
        labelled=labelled,
        correct=correct,
    )


def test_verdicts() -> None:
    champion = evidence(1000, correct=490, labelled=500)
    good = judge(POLICY, "canary", champion, evidence(120, correct=118, labelled=120), labels_expected=True)
    assert good.action == "promote", good.reason
    few = judge(POLICY, "canary", champion, evidence(120, correct=10, labelled=10), labels_expected=True)
    assert few.action == "hold" and "labels" in few.reason
    wrong = judge(POLICY, "canary", champion, evidence(120, correct=1, labelled=30), labels_expected=True)
    assert wrong.action == "rollback" and "accuracy" in wrong.reason
    failing = judge(POLICY, "canary", champion, evidence(120, errors=20), labels_expected=False)
    assert failing.action == "rollback" and "error rate" in failing.reason
    slow = judge(POLICY, "canary", champion, evidence(120, ms=5.0), labels_expected=False)
    assert slow.action == "rollback" and "p99 latency" in slow.reason
    paused = judge(POLICY, "canary", champion, evidence(120), labels_expected=False, paused=True)
    assert paused.action == "hold"
    shadow = judge(POLICY, "shadow", champion, evidence(120), labels_expected=False)
    assert shadow.action == "hold"


def timed(calls: dict[float, int]) -> VersionEvidence:
    """Evidence of calls that took these milliseconds (ms -> calls)."""
    latency: dict[int, int] = {}
    for ms, n in calls.items():
        b = latency_bucket(ms / 1000)
        latency[b] = latency.get(b, 0) + n
    total = sum(calls.values())
    return VersionEvidence(requests=total, errors=0, step_requests=total, latency=latency)


def test_the_latency_guardrail_compares_slow_calls_with_the_champions_in_the_same_window() -> None:
    policy = POLICY.model_copy(update={"max_latency_ratio": 3.0, "min_latency_difference_ms": 2.0})
    # A burst on a busy host: 4 % of both versions' calls took 12 ms instead of 0.6 ms.
    burst_champion = timed({0.6: 960, 12.0: 40})
    burst_candidate = timed({0.6: 115, 12.0: 5})
    both = judge(policy, "canary", burst_champion, burst_candidate, labels_expected=False)
    assert both.action == "promote", both.reason
    # The same few slow calls with a quiet champion: a breach (the candidate alone was slow).
    quiet_champion = timed({0.6: 1000})
    alone = judge(policy, "canary", quiet_champion, timed({0.6: 100, 12.0: 20}), labels_expected=False)
    assert alone.action == "rollback" and "against 0 of 1000" in alone.reason
    # A candidate truly over 3 x the champion's p99 (12 ms with the bursts) is rolled back.
    slow = judge(policy, "canary", burst_champion, timed({40.0: 120}), labels_expected=False)
    assert slow.action == "rollback" and "p99 latency" in slow.reason
    # 3 x slower but by less than min_latency_difference_ms: scheduling noise, not a breach.
    near = judge(policy, "canary", quiet_champion, timed({1.9: 120}), labels_expected=False)
    assert near.action == "promote", near.reason


def test_a_candidate_slow_on_most_calls_is_rolled_back_whatever_the_tail_does() -> None:
    policy = POLICY.model_copy(update={"max_latency_ratio": 3.0, "min_latency_difference_ms": 2.0})
    # A host so busy that a tenth of every version's calls wait 40 ms: the p99s are alike.
    champion = timed({0.5: 900, 40.0: 100})
    slow = judge(policy, "canary", champion, timed({5.0: 108, 40.0: 12}), labels_expected=False)
    assert slow.action == "rollback" and "median latency" in slow.reason, slow.reason
    assert "p99 latency" not in slow.reason
    # The same host and a good candidate: the same median, the same tail.
    good = judge(policy, "canary", champion, timed({0.5: 108, 40.0: 12}), labels_expected=False)
    assert good.action == "promote", good.reason
    # Half its calls slow is not "most of the time" beyond doubt.
    half = judge(policy, "canary", champion, timed({0.5: 60, 5.0: 60}), labels_expected=False)
    assert half.action == "promote", half.reason


class Catalog:
    """Two AVAILABLE versions of digits, and a config section that tests change."""

    def __init__(self) -> None:
        self.available = [1, 2]
        self.rollout: dict[str, Any] = {"mode": "canary"}

    def model_names(self) -> list[str]:
        return ["digits"]

    def has_model(self, name: str) -> bool:
        return name == "digits"

    def statuses(self, name: str) -> list[VersionStatus]:
        return [VersionStatus(v, ModelState.AVAILABLE) for v in self.available]

    def model_options(self, name: str, key: str) -> dict[str, Any]:
        return dict(self.rollout) if key == "rollout" else {}


def controller(store: Any, catalog: Catalog) -> RolloutController:
    return RolloutController(store, catalog, POLICY, CollectorRegistry(), lambda model, version: "multiclass")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_two_workers_share_one_state(store_url: str) -> None:
    """Two workers on one SQLite file, or two replicas on one PostgreSQL database."""
    url = store_url
    stores = [open_stores(url), open_stores(url)]
    catalog = Catalog()
    a, b = controller(stores[0], catalog), controller(stores[1], catalog)
    try:
        a.tick(now=100.0)
        b.tick(now=100.0)
        assert a.assignment("digits") == b.assignment("digits")
        assert (a.assignment("digits").candidate, a.assignment("digits").share) == (2, 10.0)
        # Each worker serves half the traffic; together they pass the step.
        for worker in (a, b):
            for _ in range(80):
                worker.record("digits", 2, ok=True, seconds=0.001)
                worker.record("digits", 1, ok=True, seconds=0.001)
        a.tick(now=101.0)
        b.tick(now=101.0)
        a.refresh()
        assert a.assignment("digits") == b.assignment("digits")
        assert a.assignment("digits").share == 50.0
        history = a.status("digits")["history"]
        assert [e["event"] for e in history] == ["started", "step"]
        # An operator rolls back through one worker; the other follows on its next read.
        assert b.act("digits", "rollback")["state"] == "rolled_back"
        a.refresh()
        assert a.assignment("digits").retired == frozenset({2})
        # A restarted worker reads the same state back.
        c = controller(open_stores(url), catalog)
        c.refresh()
        assert (
            c.assignment("digits").retired == frozenset({2}) and c.assignment("digits").state == "rolled_back"
        )
        c.stores.close()
    finally:
        for store in stores:
            store.close()


def test_servers_count_and_route_while_one_judge_decides(store_url: str) -> None:
    """Two servers of a control plane (``judging=False``) and the control plane's judge."""
    catalog = Catalog()
    stores = [open_stores(store_url) for _ in range(3)]
    servers = [
        RolloutController(s, catalog, POLICY, CollectorRegistry(), lambda m, v: "multiclass", judging=False)
        for s in stores[:2]
    ]
    judge_ = controller(stores[2], catalog)
    try:
        for server in servers:
            server.tick(now=100.0)
        # A server starts nothing on its own.
        assert servers[0].assignment("digits") is None and stores[0].rollouts.rollouts() == {}
        judge_.tick(now=100.0)
        for server in servers:
            server.refresh()
            assert server.assignment("digits") == judge_.assignment("digits")
        assert (judge_.assignment("digits").candidate, judge_.assignment("digits").share) == (2, 10.0)
        # Each server sees half the traffic and flushes it; only the judge moves the step.
        for server in servers:
            for _ in range(80):
                server.record("digits", 2, ok=True, seconds=0.001)
                server.record("digits", 1, ok=True, seconds=0.001)
            server.tick(now=101.0)
            assert server.assignment("digits").share == 10.0
        judge_.tick(now=101.0)
        servers[0].refresh()
        assert servers[0].assignment("digits").share == 50.0
        assert [e["event"] for e in judge_.status("digits")["history"]] == ["started", "step"]
    finally:
        for store in stores:
            store.close()


def test_invalid_config_is_refused_and_reported(tmp_path: Path) -> None:
    store = open_stores(f"sqlite:///{tmp_path / 'state.db'}")
    catalog = Catalog()
    worker = controller(store, catalog)
    try:
        worker.tick(now=100.0)
        catalog.rollout = {"mode": "canary", "steps": [10, 50]}
        worker.tick(now=101.0)
        status = worker.status("digits")
        assert "steps must end at 100" in status["config_error"]
        assert status["state"] == "canary" and status["share"] == 10.0  # routing goes on
        with pytest.raises(ServiceError, match="not in the repository") as missing:
            worker.status("iris")
        assert missing.value.code is ErrorCode.NOT_FOUND
        assert worker.act("digits", "rollback")["state"] == "rolled_back"
        with pytest.raises(ServiceError, match="only a running one") as again:
            worker.act("digits", "rollback")
        assert again.value.code is ErrorCode.FAILED_PRECONDITION
    finally:
        store.close()


def test_the_status_page_cards_show_the_rollout_escaped(tmp_path: Path) -> None:
    store = open_stores(f"sqlite:///{tmp_path / 'state.db'}")
    catalog = Catalog()
    worker = controller(store, catalog)
    try:
        assert RolloutPart(worker).html("digits") == ""  # no rollout on record: no part
        worker.tick(now=100.0)
        worker.act("digits", "pause")
        html = RolloutPart(worker).html("digits")
        assert '<span class="pill warn" data-verdict="rollout">canary (paused)</span>' in html
        for fact in ("champion v1", "candidate v2", "candidate share 10 %", "shadow agreement –"):
            assert fact in html, fact
        assert "<script" not in html and RolloutPart(None).html("digits") == ""
        assert RolloutPart(worker).html("<b>other</b>") == ""
    finally:
        store.close()


def test_prediction_drift_between_the_versions(tmp_path: Path) -> None:
    store = open_stores(f"sqlite:///{tmp_path / 'state.db'}")
    worker = controller(store, Catalog())
    try:
        worker.tick(now=100.0)
        records = [
            PredictionRecord(f"a{i}", "digits", 1, 200.0, [[0.0]], [[0.1] * 10], [i % 10], classes=10)
            for i in range(100)
        ] + [
            PredictionRecord(f"b{i}", "digits", 2, 200.0, [[0.0]], [[0.1] * 10], [3], classes=10)
            for i in range(50)
        ]
        store.predictions.record(records)
        worker.tick(now=101.0)
        drift = worker.status("digits")["guardrails"]["2"]["prediction_drift"]
        assert drift is not None and drift > 1.0  # one class against ten
    finally:
        store.close()
