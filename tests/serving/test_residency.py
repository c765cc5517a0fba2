"""Many models in bounded memory (--max-loaded-models): load on request, LRU eviction, pinning."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from modelloop.serving.errors import ModelNotFound, ModelNotReady
from modelloop.serving.runtime import Runtime
from modelloop.serving.settings import ModelConfig
from modelloop.serving.types import InferRequest, ModelMetadata, ModelState, Protocol

from .edge_support import serve
from .fakes import SlowRuntime, write_fake_version
from .test_dataplane import make_plane, request
from .test_registry import Factory, write_config

MODELS = 50
BUDGET = 10
IN_MEMORY = {ModelState.AVAILABLE.value, ModelState.LOADING.value, ModelState.UNLOADING.value}


def _write_onnx(path: Path, shift: float) -> None:
    """A tiny ONNX model: ``y = x + shift`` over float32 ``[-1, 3]``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "shift"], ["y"])],
        "shift",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("shift", TensorProto.FLOAT, [1], [shift])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture
def many(tmp_path: Path) -> Path:
    """50 models, each a copy of a tiny ONNX model that adds its own number."""
    repo = tmp_path / "models"
    for i in range(MODELS):
        version = repo / f"m{i:02d}" / "1"
        version.mkdir(parents=True)
        _write_onnx(version / "model.onnx", float(i))
        card = {
            "name": f"m{i:02d}",
            "version": 1,
            "task": "regression",
            "signature_name": "serving_default",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}],
            "labels": [],
        }
        (version / "model.json").write_text(json.dumps(card))
    return repo


def _in_memory(index: list[dict[str, str]]) -> int:
    return sum(1 for row in index if row["state"] in IN_MEMORY)


async def test_fifty_models_answer_with_room_for_ten(many: Path) -> None:
    rows = np.ones((2, 3), np.float32)
    async with serve(many, real_runtimes=True, max_loaded_models=BUDGET, warmup=True) as stack:
        dp = stack.dataplane
        index = dp.repository_index()
        assert {row["state"] for row in index} == {"UNLOADED"}
        assert "loads on its first request" in index[0]["reason"]
        assert dp.ready() and dp.model_ready("m07")
        peak = 0

        async def ask(i: int) -> None:
            nonlocal peak
            request = InferRequest(f"m{i:02d}", {"x": rows}, Protocol.V2_REST)
            response = await dp.infer(request)
            np.testing.assert_allclose(response.outputs["y"], rows + i)
            peak = max(peak, _in_memory(dp.repository_index()))

        for i in range(MODELS):  # one after another: every model a cold load
            await ask(i)
        for start in range(0, MODELS, 25):  # then 25 at a time, most of them cold again
            await asyncio.gather(*(ask(i) for i in range(start, start + 25)))
        assert peak <= BUDGET
        assert _in_memory(dp.repository_index()) <= BUDGET
        prom = stack.prometheus
        loads = sum(
            prom.get_sample_value("modelloop_model_loads_total", {"model": f"m{i:02d}"}) or 0
            for i in range(MODELS)
        )
        evictions = sum(
            prom.get_sample_value("modelloop_model_evictions_total", {"model": f"m{i:02d}"}) or 0
            for i in range(MODELS)
        )
        cold = sum(
            prom.get_sample_value("modelloop_model_cold_load_seconds_count", {"model": f"m{i:02d}"}) or 0
            for i in range(MODELS)
        )
        assert loads >= MODELS and cold == loads
        assert evictions == loads - _in_memory(dp.repository_index())


async def test_a_repeated_model_stays_loaded(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_fake_version(tmp_path, name, 1)
    factory = Factory()
    dp, prom, _ = await make_plane(tmp_path, factory, max_loaded_models=2)
    try:
        assert factory.built == []
        for name in ("a", "b", "a", "c", "a"):  # c evicts b, the least recently used
            await dp.infer(request([[1, 2, 3]], model=name))
        states = {row["name"]: row["state"] for row in dp.repository_index()}
        assert states == {"a": "AVAILABLE", "b": "UNLOADED", "c": "AVAILABLE"}
        assert prom.get_sample_value("modelloop_model_evictions_total", {"model": "b"}) == 1
        assert prom.get_sample_value("modelloop_model_loads_total", {"model": "a"}) == 1
        await dp.infer(request([[1, 2, 3]], model="b"))  # loads again, evicting c
        assert prom.get_sample_value("modelloop_model_loads_total", {"model": "b"}) == 2
        assert {row["name"]: row["state"] for row in dp.repository_index()}["c"] == "UNLOADED"
    finally:
        await dp.stop()


async def test_metadata_of_an_unloaded_version_comes_from_its_model_json(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "a", 1)
    write_fake_version(tmp_path, "a", 2)
    write_config(tmp_path, "a", {"version_policy": {"all": {}}})
    factory = Factory()
    dp, _, _ = await make_plane(tmp_path, factory, max_loaded_models=1)
    try:
        assert dp.metadata("a").version == 2 and dp.metadata("a", 1).version == 1
        assert [spec.name for spec in dp.metadata("a").inputs] == ["x"]
        assert factory.built == []  # nothing loaded to answer
        with pytest.raises(ModelNotFound):
            dp.metadata("a", 7)
    finally:
        await dp.stop()


async def test_pinned_models_load_at_start_and_stay(tmp_path: Path) -> None:
    for name in ("pinned", "b", "c"):
        write_fake_version(tmp_path, name, 1)
    write_config(tmp_path, "pinned", {"pinned": True})
    dp, prom, _ = await make_plane(tmp_path, Factory(), max_loaded_models=2)
    try:
        states = {row["name"]: row["state"] for row in dp.repository_index()}
        assert states == {"pinned": "AVAILABLE", "b": "UNLOADED", "c": "UNLOADED"}
        for name in ("b", "c", "b"):
            await dp.infer(request([[1, 2, 3]], model=name))
        states = {row["name"]: row["state"] for row in dp.repository_index()}
        assert states["pinned"] == "AVAILABLE"
        assert prom.get_sample_value("modelloop_model_evictions_total", {"model": "pinned"}) is None
    finally:
        await dp.stop()


async def test_no_room_beside_pinned_models_is_a_bounded_wait(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "pinned", 1)
    write_fake_version(tmp_path, "other", 1)
    write_config(tmp_path, "pinned", {"pinned": True})
    dp, _, _ = await make_plane(tmp_path, Factory(), max_loaded_models=1, load_wait_s=0.2)
    try:
        with pytest.raises(ModelNotReady, match=r"no room to load (a model|it): all 1 loaded versions"):
            await dp.infer(request([[1, 2, 3]], model="other"))
        await asyncio.sleep(0.05)
        assert dp.registry._cold_loads == {}  # the load gave up too: nothing left polling
        assert {row["name"]: row["state"] for row in dp.repository_index()}["other"] == "UNLOADED"
        assert (await dp.infer(request([[1, 2, 3]], model="pinned"))).model == "pinned"
    finally:
        await dp.stop()


async def test_a_version_with_requests_in_flight_is_never_evicted(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "slow", 1)
    write_fake_version(tmp_path, "other", 1)
    slow = SlowRuntime()

    class SlowFirst(Factory):
        def __call__(self, kind: str, path: Path, metadata: ModelMetadata, config: ModelConfig) -> Runtime:
            if metadata.name != "slow":
                return super().__call__(kind, path, metadata, config)
            slow.metadata = metadata
            return slow

    dp, _, _ = await make_plane(tmp_path, SlowFirst(), max_loaded_models=1, load_wait_s=0.3, warmup=False)
    try:
        busy = asyncio.create_task(dp.infer(request([[1, 2, 3]], model="slow")))
        await asyncio.to_thread(slow.started.wait, 5)
        no_room = r"model 'other' version 1 is not loaded yet: no room to load it: all 1 loaded versions"
        with pytest.raises(ModelNotReady, match=no_room):
            await dp.infer(request([[1, 2, 3]], model="other"))
        assert {row["name"]: row["state"] for row in dp.repository_index()}["slow"] == "AVAILABLE"
        slow.release.set()
        await busy
        response = await dp.infer(request([[1, 2, 3]], model="other"))  # now there is room
        assert response.model == "other"
        assert {row["name"]: row["state"] for row in dp.repository_index()}["slow"] == "UNLOADED"
    finally:
        slow.release.set()
        await dp.stop()
