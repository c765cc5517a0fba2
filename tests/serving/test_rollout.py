"""The rollout policy and serving's side of a rollout: what is loaded, who answers."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelloop.serving.dataplane import DataPlane
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository
from modelloop.serving.rollout import RolloutCoordinator, in_share
from modelloop.serving.settings import ModelConfig, ServingSettings, VersionPolicy
from modelloop.serving.types import (
    InferRequest,
    ModelState,
    Protocol,
    RolloutAssignment,
    RolloutPolicy,
    resolve_policy,
)
from tests.serving.edge_support import RuntimeFactory, failing, write_config, write_digits

LATEST = VersionPolicy().select


class StateRouter:
    """A router over a fixed state, recording what serving tells it."""

    def __init__(self, assignment: RolloutAssignment | None = None) -> None:
        self.state = assignment
        self.calls: list[tuple[str, int, bool]] = []

    def assignment(self, model: str) -> RolloutAssignment | None:
        return self.state

    def record(self, model: str, version: int, *, ok: bool, seconds: float) -> None:
        self.calls.append((model, version, ok))

    def record_shadow(
        self, model: str, version: int, *, ok: bool, seconds: float, rows: int, agreed: int
    ) -> None:
        self.calls.append((model, version, ok))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"mode": "sideways"}, "mode"),
        ({"steps": [50, 10, 100]}, "steps must increase"),
        ({"steps": [10, 50]}, "end at 100"),
        ({"steps": [0, 100]}, "outside (0, 100]"),
        ({"max_error_rate": 1.5}, "max_error_rate"),
        ({"max_latency_ratio": 0.5}, "max_latency_ratio"),
        ({"step_min_requests": 0}, "step_min_requests"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_policies_are_refused_with_the_reason(raw: dict[str, object], problem: str) -> None:
    policy, error = resolve_policy(RolloutPolicy(), raw)
    assert policy is None
    assert problem in error and error.startswith("invalid rollout config")


def test_a_model_section_overrides_the_defaults_field_by_field() -> None:
    defaults = RolloutPolicy(mode="canary", step_min_requests=50)
    policy, error = resolve_policy(defaults, {"steps": [25, 100]})
    assert error == "" and policy is not None
    assert (policy.mode, policy.steps, policy.step_min_requests) == ("canary", [25, 100], 50)
    # config.json keeps the section free-form: a bad rollout never fails the rest of the config.
    assert ModelConfig.model_validate({"rollout": {"mode": "sideways"}}).rollout == {"mode": "sideways"}


def test_the_split_is_stable_and_grows_monotonically() -> None:
    ids = [f"req-{i}" for i in range(4000)]
    at10 = {i for i in ids if in_share("digits", i, 10)}
    at50 = {i for i in ids if in_share("digits", i, 50)}
    assert at10 == {i for i in ids if in_share("digits", i, 10)}  # the same id, the same side
    assert at10 <= at50
    assert 0.07 < len(at10) / len(ids) < 0.13 and 0.45 < len(at50) / len(ids) < 0.55
    assert not in_share("digits", "x", 0) and in_share("digits", "x", 100)


def test_off_changes_nothing() -> None:
    coordinator = RolloutCoordinator(RolloutPolicy(), StateRouter())
    assert coordinator.plan("digits", {}, [1, 2], LATEST, [1]) == [2]
    assert coordinator.pair("digits") is None
    assert coordinator.choose("digits", 2, "r1") is None
    assert coordinator.default_version("digits", [1, 2]) == 2


def test_a_new_version_beside_a_serving_one_makes_a_pair() -> None:
    router = StateRouter()
    coordinator = RolloutCoordinator(RolloutPolicy(mode="canary"), router)
    assert coordinator.plan("digits", {}, [1, 2], LATEST, [1]) == [1, 2]
    assert coordinator.pair("digits") == (1, 2)
    # Before the controller has started the rollout, everything goes to the champion.
    assert coordinator.default_version("digits", [1, 2]) == 1
    assert coordinator.choose("digits", 1, "r1") is None
    router.state = RolloutAssignment(champion=1, candidate=2, mode="canary", share=50.0, state="canary")
    choices = [coordinator.choose("digits", 1, f"r{i}") for i in range(200)]
    to_candidate = [c for c in choices if c is not None and c.answer == 2]
    assert to_candidate and all(c.fallback == 1 for c in to_candidate)
    assert len(to_candidate) < 200
    # Shadow mode: the champion answers, the candidate gets a copy.
    router.state = RolloutAssignment(champion=1, candidate=2, mode="shadow", share=0.0, state="shadow")
    choice = coordinator.choose("digits", 1, "r1")
    assert choice is not None and (choice.answer, choice.shadow) == (1, 2)


def test_promotion_and_rollback_change_what_loads() -> None:
    router = StateRouter(
        RolloutAssignment(champion=2, candidate=None, mode="canary", share=0.0, state="promoted")
    )
    coordinator = RolloutCoordinator(RolloutPolicy(mode="canary"), router)
    assert coordinator.plan("digits", {}, [1, 2], LATEST, [1, 2]) == [2]  # the old champion goes
    router.state = RolloutAssignment(
        champion=1, candidate=2, mode="canary", share=0.0, state="rolled_back", retired=frozenset({2})
    )
    assert coordinator.plan("digits", {}, [1, 2], LATEST, [1, 2]) == [1]  # RETIRED: not loaded again
    assert coordinator.plan("digits", {}, [1, 2, 3], LATEST, [1]) == [1, 3]  # until a newer one comes
    # After a restart nothing is loaded yet; the stored champion is loaded beside the candidate.
    router.state = RolloutAssignment(champion=1, candidate=2, mode="canary", share=10.0, state="canary")
    fresh = RolloutCoordinator(RolloutPolicy(mode="canary"), router)
    assert fresh.plan("digits", {}, [1, 2], LATEST, []) == [1, 2]


def test_an_invalid_section_keeps_the_last_good_policy() -> None:
    coordinator = RolloutCoordinator(RolloutPolicy(), StateRouter())
    assert coordinator.plan("digits", {"mode": "canary"}, [1, 2], LATEST, [1]) == [1, 2]
    assert coordinator.plan("digits", {"mode": "sideways"}, [1, 2], LATEST, [1, 2]) == [1, 2]
    assert "mode" in coordinator.config_error("digits")
    assert coordinator.policy("digits", {"mode": "sideways"}).mode == "canary"


async def test_the_data_plane_falls_back_to_the_champion_and_shadows_after_the_answer(tmp_path: Path) -> None:
    write_digits(tmp_path, versions=(1, 2))
    write_config(
        tmp_path, "digits", {"version_policy": {"all": {}}, "runtime": "onnx", "rollout": {"mode": "canary"}}
    )
    factory = RuntimeFactory({("digits", 2): failing(RuntimeError("candidate broke"))})
    router = StateRouter(
        RolloutAssignment(champion=1, candidate=2, mode="canary", share=100.0, state="canary")
    )
    settings = ServingSettings(repo=tmp_path, poll_interval_s=3600, warmup=False)
    metrics = ServingMetrics(CollectorRegistry())
    registry = ModelRegistry(
        ModelRepository(tmp_path),
        settings,
        metrics=metrics,
        runtime_factory=factory,
        rollouts=RolloutCoordinator(RolloutPolicy(), router),
    )
    dataplane = DataPlane(registry, metrics)
    await dataplane.start()
    try:
        await registry.poll()  # both AVAILABLE now: 1 is the champion, 2 the candidate
        pixels = np.arange(64, dtype=np.float32).reshape(1, 64)
        request = InferRequest(model="digits", inputs={"pixels": pixels}, protocol=Protocol.V2_REST, id="r1")
        response = await dataplane.infer(request)
        assert response.version == 1  # the candidate raised; the champion answered
        assert router.calls == [("digits", 2, False), ("digits", 1, True)]
        pinned = await dataplane.infer(dataclasses.replace(request, version=1))
        np.testing.assert_array_equal(response.outputs["probabilities"], pinned.outputs["probabilities"])
        # Shadow: the champion answers; the candidate gets the copy after the answer.
        router.state = RolloutAssignment(champion=1, candidate=2, mode="shadow", share=0.0, state="shadow")
        router.calls.clear()
        response = await dataplane.infer(dataclasses.replace(request, id="r2"))
        assert response.version == 1 and router.calls == [("digits", 1, True)]
        await asyncio.sleep(0.05)
        assert router.calls == [("digits", 1, True), ("digits", 2, False)]
    finally:
        await dataplane.stop()


async def test_a_version_kept_out_by_the_state_shows_why_in_every_status(tmp_path: Path) -> None:
    write_digits(tmp_path, versions=(1, 2))
    write_config(tmp_path, "digits", {"runtime": "onnx", "rollout": {"mode": "canary"}})
    why = "RETIRED by rollout digits-2-1 (rolled back at 1970-01-01 00:00:01 UTC: error rate 0.5)"
    router = StateRouter(
        RolloutAssignment(
            champion=3,
            candidate=None,
            mode="canary",
            share=0.0,
            state="rolled_back",
            retired=frozenset({2}),
            retired_why={2: why},
        )
    )
    settings = ServingSettings(repo=tmp_path, poll_interval_s=3600, warmup=False)
    coordinator = RolloutCoordinator(RolloutPolicy(), router)
    registry = ModelRegistry(
        ModelRepository(tmp_path),
        settings,
        metrics=ServingMetrics(CollectorRegistry()),
        runtime_factory=RuntimeFactory(),
        rollouts=coordinator,
    )
    await registry.poll()
    try:
        expected = (
            f"version 2 is kept out: {why} (the rollout state also names version 3, which this "
            "repository lacks: it may come from another repository); clear with "
            "`modelloop rollout clear digits`"
        )
        statuses = registry.statuses("digits")
        assert [(s.version, s.state) for s in statuses] == [(1, ModelState.AVAILABLE), (2, ModelState.END)]
        assert statuses[1].error_message == expected
        assert registry.status("digits", 2).error_message == expected
        assert {"name": "digits", "version": "2", "state": "END", "reason": expected} in registry.index()
        # Cleared: the state names nothing any more, and version 2 loads.
        router.state = None
        await registry.poll()
        assert [(s.version, s.state, s.error_message) for s in registry.statuses("digits")][-1] == (
            2,
            ModelState.AVAILABLE,
            "",
        )
        assert coordinator.kept_out("digits") == {}
    finally:
        await registry.stop()
