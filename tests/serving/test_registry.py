"""ModelRegistry: version policy, labels, hot reload, failures and in-flight unloads."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelloop.serving.errors import ModelNotFound, ModelNotReady
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository, RepositoryUnavailable
from modelloop.serving.runtime import Runtime
from modelloop.serving.settings import ModelConfig, ServingSettings
from modelloop.serving.types import ModelMetadata, ModelState
from modelloop.serving.warmup import synthetic_inputs as warmup_inputs

from .fakes import FailingLoadRuntime, FakeRuntime, SlowRuntime, fake_metadata, write_fake_version


class Factory:
    """Builds FakeRuntimes (offset = 100 * version) unless ``kinds`` says otherwise."""

    def __init__(self, kinds: dict[int, Callable[[ModelMetadata], Runtime]] | None = None) -> None:
        self.kinds = kinds or {}
        self.built: list[Runtime] = []

    def __call__(self, kind: str, path: Path, metadata: ModelMetadata, config: ModelConfig) -> Runtime:
        make = self.kinds.get(metadata.version, lambda m: FakeRuntime(m, offset=100 * m.version))
        runtime = make(metadata)
        self.built.append(runtime)
        return runtime

    def count(self, version: int) -> int:
        return sum(1 for r in self.built if r.metadata.version == version)


def make_registry(
    repo: Path, factory: Factory | None = None, **settings: object
) -> tuple[ModelRegistry, CollectorRegistry]:
    prom = CollectorRegistry()
    registry = ModelRegistry(
        ModelRepository(repo),
        ServingSettings(repo=repo, poll_interval_s=3600, **settings),
        metrics=ServingMetrics(prom),
        runtime_factory=factory or Factory(),
    )
    return registry, prom


def write_config(repo: Path, name: str, config: dict[str, object]) -> None:
    (repo / name / "config.json").write_text(json.dumps(config))


async def run(registry: ModelRegistry, version: int | None = None, label: str | None = None) -> float:
    servable = registry.resolve("m", version, label)
    with servable.use():
        out = await servable.batcher.predict({"x": np.zeros((1, 3), np.float32)})
    return float(out["sum"][0, 0])


async def test_serves_only_the_latest_version_by_default(tmp_path: Path) -> None:
    for v in (1, 2):
        write_fake_version(tmp_path, "m", v)
    registry, prom = make_registry(tmp_path)
    await registry.start()
    assert [(s.version, s.state) for s in registry.statuses("m")] == [(2, ModelState.AVAILABLE)]
    assert await run(registry) == 200.0
    assert prom.get_sample_value("modelloop_model_versions_loaded", {"model": "m"}) == 1
    await registry.stop()
    assert [(s.version, s.state) for s in registry.statuses("m")] == [(2, ModelState.END)]


async def test_latest_is_the_highest_integer(tmp_path: Path) -> None:
    for v in (2, 10, 9):
        write_fake_version(tmp_path, "m", v)
    write_config(tmp_path, "m", {"version_policy": {"all": {}}})
    registry, _ = make_registry(tmp_path)
    await registry.poll()
    assert registry.resolve("m").version == 10
    assert [s.version for s in registry.statuses("m")] == [2, 9, 10]
    await registry.stop()


@pytest.mark.parametrize(
    ("policy", "loaded"),
    [
        ({"latest": {"num_versions": 2}}, [2, 3]),
        ({"all": {}}, [1, 2, 3]),
        ({"specific": {"versions": [1, 3, 7]}}, [1, 3]),
        ({}, [3]),
    ],
)
async def test_version_policy(tmp_path: Path, policy: dict[str, object], loaded: list[int]) -> None:
    for v in (1, 2, 3):
        write_fake_version(tmp_path, "m", v)
    write_config(tmp_path, "m", {"version_policy": policy})
    registry, _ = make_registry(tmp_path)
    await registry.poll()
    assert [s.version for s in registry.statuses("m") if s.state is ModelState.AVAILABLE] == loaded
    await registry.stop()


async def test_labels_resolve_to_their_version(tmp_path: Path) -> None:
    for v in (1, 2):
        write_fake_version(tmp_path, "m", v)
    write_config(tmp_path, "m", {"version_policy": {"all": {}}, "version_labels": {"stable": 1, "canary": 2}})
    registry, _ = make_registry(tmp_path)
    await registry.poll()
    assert await run(registry, label="stable") == 100.0
    assert await run(registry, label="canary") == 200.0
    assert registry.version_labels("m") == {"stable": 1, "canary": 2}
    with pytest.raises(ModelNotFound, match=r"no version label 'beta'.*canary, stable"):
        registry.resolve("m", label="beta")
    await registry.stop()


async def test_unknown_model_and_version(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    registry, _ = make_registry(tmp_path)
    await registry.poll()
    with pytest.raises(ModelNotFound, match=r"model 'nope' not found.*models: m"):
        registry.resolve("nope")
    with pytest.raises(ModelNotFound, match="no loaded version 5"):
        registry.resolve("m", version=5)
    await registry.stop()


async def test_new_version_loads_before_the_old_one_unloads(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    gate = threading.Event()

    class GatedLoad(FakeRuntime):
        def load(self) -> None:
            gate.wait(10)
            super().load()

    factory = Factory({2: lambda m: GatedLoad(m, offset=200)})
    registry, _ = make_registry(tmp_path, factory)
    await registry.poll()
    write_fake_version(tmp_path, "m", 2)
    poll = asyncio.ensure_future(registry.poll())
    for _ in range(200):  # the load runs on a worker thread; the loop stays free
        await asyncio.sleep(0.005)
        if registry.status("m", 2).state is ModelState.LOADING:
            break
    assert registry.status("m", 2).state is ModelState.LOADING
    assert await run(registry) == 100.0  # v1 still serves while v2 loads
    gate.set()
    await poll
    assert registry.status("m", 2).state is ModelState.AVAILABLE
    assert await run(registry) == 200.0
    await registry.settle()
    assert registry.status("m", 1).state is ModelState.END
    assert factory.built[0].unloaded
    await registry.stop()


async def test_failed_load_keeps_the_old_version_serving(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    factory = Factory({2: FailingLoadRuntime})
    registry, prom = make_registry(tmp_path, factory)
    await registry.poll()
    write_fake_version(tmp_path, "m", 2)
    await registry.poll()
    status = registry.status("m", 2)
    assert status.state is ModelState.FAILED
    assert "corrupt model file" in status.error_message
    assert registry.status("m", 1).state is ModelState.AVAILABLE
    assert await run(registry) == 100.0
    assert prom.get_sample_value("modelloop_model_load_failures_total", {"model": "m"}) == 1
    with pytest.raises(ModelNotReady, match="version 2 is FAILED: ValueError: corrupt model file"):
        registry.resolve("m", version=2)

    # Not retried on every poll ...
    await registry.poll()
    assert factory.count(2) == 1
    # ... but retried once its directory changes, and then it replaces v1.
    factory.kinds.clear()
    later = os.stat(tmp_path / "m" / "2" / "model.json").st_mtime + 5
    os.utime(tmp_path / "m" / "2" / "model.json", (later, later))
    await registry.poll()
    assert factory.count(2) == 2
    assert registry.status("m", 2).state is ModelState.AVAILABLE
    await registry.settle()
    assert registry.status("m", 1).state is ModelState.END
    await registry.stop()


async def test_corrupt_metadata_fails_the_version(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.json").write_text("{not json")
    registry, _ = make_registry(tmp_path)
    await registry.poll()
    assert registry.status("m", 1).state is ModelState.FAILED
    assert "model.json is unreadable or not JSON" in registry.status("m", 1).error_message
    with pytest.raises(ModelNotReady, match="no available version: version 1 FAILED"):
        registry.resolve("m")
    await registry.stop()


async def test_warmup_checks_the_outputs(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)

    class NoOutputs(FakeRuntime):
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {}

    factory = Factory({1: NoOutputs})
    registry, _ = make_registry(tmp_path, factory)
    await registry.poll()
    assert "warmup" in registry.status("m", 1).error_message
    assert factory.built[0].unloaded
    registry2, _ = make_registry(tmp_path, Factory({1: NoOutputs}), warmup=False)
    await registry2.poll()
    assert registry2.status("m", 1).state is ModelState.AVAILABLE
    await registry.stop()
    await registry2.stop()


async def test_removing_a_version_directory_unloads_it(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    write_fake_version(tmp_path, "m", 2)
    factory = Factory()
    registry, _ = make_registry(tmp_path, factory)
    await registry.poll()
    shutil.rmtree(tmp_path / "m" / "2")
    await registry.poll()
    await registry.settle()
    assert factory.built[0].metadata.version == 2 and factory.built[0].unloaded
    assert registry.resolve("m").version == 1  # latest-1 falls back to what is left
    # Ended but not yet forgotten: a request pinned to it is told it is not there (404).
    assert [(s.version, s.state.value) for s in registry.statuses("m")] == [(1, "AVAILABLE"), (2, "END")]
    with pytest.raises(ModelNotFound, match="no loaded version 2"):
        registry.resolve("m", 2)
    await registry.poll()
    assert [s.version for s in registry.statuses("m")] == [1]
    await registry.stop()


async def test_removing_a_model_unloads_it(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    factory = Factory()
    registry, prom = make_registry(tmp_path, factory)
    await registry.poll()
    shutil.rmtree(tmp_path / "m")
    await registry.poll()
    await registry.settle()
    assert factory.built[0].unloaded
    assert registry.model_names() == []
    assert prom.get_sample_value("modelloop_model_versions_loaded", {"model": "m"}) == 0
    await registry.stop()


async def test_in_flight_requests_finish_before_unload(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    slow = SlowRuntime(fake_metadata("m", 1))
    slow.release.set()  # let warmup through
    factory = Factory({1: lambda m: slow})
    registry, _ = make_registry(tmp_path, factory)
    await registry.poll()
    slow.release.clear()
    slow.started.clear()
    request = asyncio.ensure_future(run(registry))
    await asyncio.to_thread(slow.started.wait, 5)
    write_fake_version(tmp_path, "m", 2)
    await registry.poll()
    assert registry.resolve("m").version == 2
    for _ in range(500):  # the unload starts, then waits for the request in flight
        if registry.status("m", 1).state is ModelState.UNLOADING:
            break
        await asyncio.sleep(0.002)
    assert registry.status("m", 1).state is ModelState.UNLOADING
    assert not slow.unloaded
    slow.release.set()
    assert await request == 0.0
    await registry.settle()
    assert registry.status("m", 1).state is ModelState.END
    assert slow.unloaded
    await registry.stop()


async def test_bad_config_keeps_the_last_good_config(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    registry, _ = make_registry(tmp_path)
    await registry.poll()
    write_config(tmp_path, "m", {"version_polcy": {"all": {}}})
    write_fake_version(tmp_path, "m", 2)
    await registry.poll()
    assert registry.resolve("m").version == 2
    rows = registry.index()
    assert rows[0]["state"] == "FAILED"
    assert "version_polcy" in rows[0]["reason"] and "config.json" in rows[0]["reason"]
    # The last good config (latest 1) still applies, so v2 replaced v1 ...
    await registry.settle()
    assert registry.resolve("m").version == 2
    # ... and a fixed config takes over on the next poll.
    write_config(tmp_path, "m", {"version_policy": {"all": {}}})
    await registry.poll()
    assert [r["state"] for r in registry.index()] == ["AVAILABLE", "AVAILABLE"]
    await registry.stop()


async def test_label_on_an_unloaded_version_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_fake_version(tmp_path, "m", 1)
    write_fake_version(tmp_path, "m", 2)
    write_config(tmp_path, "m", {"version_labels": {"stable": 1}})
    registry, _ = make_registry(tmp_path)
    for _ in range(3):
        await registry.poll()
    assert caplog.text.count("label 'stable' names version 1") == 1
    with pytest.raises(ModelNotFound, match="no loaded version 1"):
        registry.resolve("m", label="stable")
    await registry.stop()


async def test_new_model_with_bad_config_is_not_ready(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    write_config(tmp_path, "m", {"version_policy": {"latest": {"num_versions": 0}}})
    registry, _ = make_registry(tmp_path)
    await registry.poll()
    with pytest.raises(ModelNotReady, match="num_versions"):
        registry.resolve("m")
    await registry.stop()


async def test_repository_load_and_unload(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    factory = Factory()
    registry, _ = make_registry(tmp_path, factory)
    await registry.poll()
    await registry.unload_model("m")
    assert factory.built[0].unloaded
    with pytest.raises(ModelNotReady, match="unloaded through the repository API"):
        registry.resolve("m")
    await registry.poll()  # polling does not bring it back
    assert factory.count(1) == 1
    await registry.load_model("m")
    assert registry.resolve("m").version == 1
    with pytest.raises(ModelNotFound):
        await registry.load_model("absent")
    with pytest.raises(ModelNotFound):
        await registry.unload_model("absent")
    await registry.stop()


async def test_load_model_reports_why_nothing_loaded(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    registry, _ = make_registry(tmp_path, Factory({1: FailingLoadRuntime}))
    with pytest.raises(ModelNotReady, match="corrupt model file"):
        await registry.load_model("m")
    await registry.stop()


async def test_poll_loop_picks_up_new_versions(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    registry, _ = make_registry(tmp_path)
    registry.settings.poll_interval_s = 0.02
    await registry.start()
    write_fake_version(tmp_path, "m", 2)
    for _ in range(200):
        await asyncio.sleep(0.01)
        if registry.resolve("m").version == 2:
            break
    assert registry.resolve("m").version == 2
    await registry.stop()


def test_warmup_inputs_follow_the_metadata() -> None:
    batch = warmup_inputs(fake_metadata(features=5))
    assert batch["x"].shape == (1, 5) and batch["x"].dtype == np.float32


class FlakyRemote(ModelRepository):
    """A remote repository's local copy whose store fails while ``down`` is set."""

    remote = "s3://bucket/models"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down = True

    def sync(self) -> None:
        if self.down:
            raise RepositoryUnavailable("s3://bucket/models: cannot reach the object store")


async def test_a_remote_repository_loads_nothing_until_read_and_keeps_serving_when_it_fails(
    tmp_path: Path,
) -> None:
    write_fake_version(tmp_path, "m", 1)  # a stale copy from an earlier run
    repository = FlakyRemote(tmp_path)
    prom = CollectorRegistry()
    registry = ModelRegistry(
        repository,
        ServingSettings(repo=tmp_path, poll_interval_s=3600),
        metrics=ServingMetrics(prom),
        runtime_factory=Factory(),
    )
    await registry.start()
    # Never read: nothing loads from the stale copy, and the reason is kept for readiness.
    assert registry.model_names() == [] and not registry.repository_synced
    assert "cannot reach the object store" in registry.repository_error
    repository.down = False
    await registry.poll()
    assert registry.repository_synced and registry.repository_error == ""
    assert await run(registry) == 100.0
    # The store goes away: the loaded version keeps serving, each failed poll is counted.
    repository.down = True
    await registry.poll()
    await registry.poll()
    assert await run(registry) == 100.0
    assert registry.repository_synced and "cannot reach" in registry.repository_error
    assert prom.get_sample_value("modelloop_repository_errors_total") == 3
    await registry.stop()
