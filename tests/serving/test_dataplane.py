"""DataPlane: resolution, validation errors, outputs, metrics, observer and lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from modelloop.serving.dataplane import DataPlane, DecodedRequest
from modelloop.serving.errors import InferenceFailed, InvalidInput, ModelNotFound, ModelNotReady, QueueFull
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository
from modelloop.serving.settings import ServingSettings
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    TensorSpec,
)
from modelloop.serving.validation import cast_input

from .fakes import ErrorRuntime, FakeRuntime, SlowRuntime, write_fake_version
from .test_registry import Factory, write_config


class RecordingObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[InferRequest, InferResponse]] = []

    def observe(self, request: InferRequest, response: InferResponse) -> None:
        self.seen.append((request, response))


def request(x: object, **kwargs: object) -> InferRequest:
    fields: dict[str, object] = {"model": "m", "inputs": {"x": np.asarray(x)}, "protocol": Protocol.V2_REST}
    fields.update(kwargs)
    return InferRequest(**fields)  # type: ignore[arg-type]


async def make_plane(
    repo: Path, factory: Factory | None = None, **settings: object
) -> tuple[DataPlane, CollectorRegistry, RecordingObserver]:
    prom = CollectorRegistry()
    metrics = ServingMetrics(prom)
    registry = ModelRegistry(
        ModelRepository(repo),
        ServingSettings(repo=repo, poll_interval_s=3600, **settings),
        metrics=metrics,
        runtime_factory=factory or Factory(),
    )
    observer = RecordingObserver()
    plane = DataPlane(registry, metrics, observer=observer)
    await plane.start()
    return plane, prom, observer


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[DataPlane, CollectorRegistry, RecordingObserver]]:
    write_fake_version(tmp_path, "m", 1)
    write_fake_version(tmp_path, "m", 2)
    write_config(tmp_path, "m", {"version_policy": {"all": {}}, "version_labels": {"stable": 1}})
    made = await make_plane(tmp_path, batching={"max_batch_size": 4, "batch_timeout_micros": 0})
    yield made
    await made[0].stop()


async def test_infer_latest_version_and_label(
    plane: tuple[DataPlane, CollectorRegistry, RecordingObserver],
) -> None:
    dp, prom, observer = plane
    response = await dp.infer(request([[1, 2, 3], [4, 5, 6]]))
    assert response.model == "m" and response.version == 2
    np.testing.assert_allclose(response.outputs["sum"], [[206.0], [215.0]])
    assert list(response.outputs) == ["sum", "echo"]
    assert len(response.id) == 32
    pinned = await dp.infer(request([[1, 1, 1]], version=1, id="abc"))
    assert pinned.version == 1 and pinned.id == "abc"
    labelled = await dp.infer(request([[1, 1, 1]], label="stable"))
    assert labelled.version == 1
    ok = {"model": "m", "version": "2", "protocol": "v2_rest", "code": "OK"}
    assert prom.get_sample_value("modelloop_requests_total", ok) == 1
    assert (
        prom.get_sample_value(
            "modelloop_request_duration_seconds_count", {"model": "m", "version": "1", "protocol": "v2_rest"}
        )
        == 2
    )
    # The observer sees the cast inputs (ints became float32) and the response.
    seen_request, seen_response = observer.seen[0]
    assert seen_request.inputs["x"].dtype == np.float32 and seen_response is response


async def test_requested_outputs(plane: tuple[DataPlane, CollectorRegistry, RecordingObserver]) -> None:
    dp, _, _ = plane
    response = await dp.infer(request([[1.0, 2.0, 3.0]], outputs=["echo"]))
    assert list(response.outputs) == ["echo"]
    with pytest.raises(
        InvalidInput, match="unknown output 'nope' for model 'm'; its outputs are 'sum', 'echo'"
    ):
        await dp.infer(request([[1.0, 2.0, 3.0]], outputs=["nope"]))


@pytest.mark.parametrize(
    ("req", "error", "message"),
    [
        (request([[1, 2, 3]], model="zzz"), ModelNotFound, "model 'zzz' not found"),
        (request([[1, 2, 3]], version=9), ModelNotFound, "model 'm' has no loaded version 9"),
        (request([[1, 2, 3]], label="beta"), ModelNotFound, "no version label 'beta'"),
        (request([[1, 2, 3]], signature_name="other"), ModelNotFound, "no signature 'other'"),
        (InferRequest("m", {"y": np.ones((1, 3))}, Protocol.V2_REST), InvalidInput, "unknown input 'y'.*'x'"),
        (InferRequest("m", {}, Protocol.V2_REST), InvalidInput, "has no inputs; model 'm' expects 'x'"),
        (
            InferRequest("m", {"x": np.ones((1, 3)), "y": np.ones((1, 3))}, Protocol.V2_REST),
            InvalidInput,
            "unknown input 'y'",
        ),
        (request([["a", "b", "c"]]), InvalidInput, "dtype <U1|dtype str"),
        (request([[True, False, True]]), InvalidInput, "booleans are not numbers"),
        (request(np.array([[None, 1, 2]], dtype=object)), InvalidInput, "dtype object"),
        (
            request([1.0, 2.0, 3.0]),
            InvalidInput,
            r"shape \[3\] \(rank 1\); model 'm' expects rank 2, shape \[-1, 3\]",
        ),
        (request([[1.0, 2.0]]), InvalidInput, r"has 2 features \(shape \[1, 2\]\); model 'm' expects 3"),
        (request(np.zeros((0, 3))), InvalidInput, "empty batch"),
        (request(np.zeros((5, 3))), InvalidInput, "batch of 5 rows; model 'm' takes at most 4"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_bad_requests_raise_the_right_error(
    plane: tuple[DataPlane, CollectorRegistry, RecordingObserver],
    req: InferRequest,
    error: type,
    message: str,
) -> None:
    dp, prom, observer = plane
    with pytest.raises(error, match=message):
        await dp.infer(req)
    assert observer.seen == []
    code = error.code.value
    model = "m" if req.model == "m" else ""  # unknown names never become label values
    total = sum(
        prom.get_sample_value(
            "modelloop_requests_total", {"model": model, "version": v, "protocol": "v2_rest", "code": code}
        )
        or 0
        for v in ("", "1", "2")
    )
    assert total == 1


def test_cast_input_rules() -> None:
    f32 = TensorSpec("x", np.dtype("float32"), (-1, 2))
    i8 = TensorSpec("x", np.dtype("int8"), (-1, 2))
    assert cast_input(np.array([[1, 2]], np.int64), f32, "m").dtype == np.float32
    assert cast_input(np.array([[1.5, 2]], np.float64), f32, "m").dtype == np.float32
    assert cast_input(np.array([[1, 2]], np.int64), i8, "m").dtype == np.int8
    with pytest.raises(InvalidInput, match="do not fit in int8"):
        cast_input(np.array([[1, 300]], np.int64), i8, "m")
    with pytest.raises(InvalidInput, match="cannot be cast without loss"):
        cast_input(np.array([[1.5, 2]]), i8, "m")


async def test_inputs_with_different_batch_sizes(tmp_path: Path) -> None:
    import json

    path = write_fake_version(tmp_path, "two", 1)
    meta = json.loads((path / "model.json").read_text())
    meta["inputs"].append({"name": "z", "dtype": "float32", "shape": [-1, 1]})
    (path / "model.json").write_text(json.dumps(meta))
    dp, _, _ = await make_plane(tmp_path)
    with pytest.raises(InvalidInput, match="must share their batch size; got 2 and 1 rows"):
        await dp.infer(InferRequest("two", {"x": np.ones((2, 3)), "z": np.ones((1, 1))}, Protocol.V2_GRPC))
    with pytest.raises(InvalidInput, match="missing input 'z'"):
        await dp.infer(InferRequest("two", {"x": np.ones((2, 3))}, Protocol.V2_GRPC))
    await dp.stop()


async def test_runtime_error_is_inference_failed(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)

    class FailsAfterWarmup(ErrorRuntime):
        def load(self) -> None:
            self.warm = True

        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if self.warm:
                self.warm = False
                return FakeRuntime.predict(self, inputs)
            return super().predict(inputs)

    dp, prom, _ = await make_plane(tmp_path, Factory({1: FailsAfterWarmup}))
    with pytest.raises(InferenceFailed, match="boom"):
        await dp.infer(request([[1, 2, 3]]))
    labels = {"model": "m", "version": "1", "protocol": "v2_rest", "code": "INTERNAL"}
    assert prom.get_sample_value("modelloop_requests_total", labels) == 1
    await dp.stop()


async def test_queue_full_is_reported(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    slow = SlowRuntime()
    slow.release.set()
    dp, _, _ = await make_plane(
        tmp_path,
        Factory({1: lambda m: slow}),
        batching={"max_batch_size": 1, "max_enqueued_batches": 1, "batch_timeout_micros": 0},
    )
    slow.release.clear()
    slow.started.clear()
    first = asyncio.ensure_future(dp.infer(request([[1, 2, 3]])))
    await asyncio.to_thread(slow.started.wait, 5)
    second = asyncio.ensure_future(dp.infer(request([[1, 2, 3]])))
    batcher = dp.registry.resolve("m").batcher
    for _ in range(500):  # until the second request waits in the (one-row) queue
        if batcher.queued_rows == 1:
            break
        await asyncio.sleep(0.002)
    assert batcher.queued_rows == 1
    with pytest.raises(QueueFull):
        await dp.infer(request([[1, 2, 3]]))
    slow.release.set()
    await asyncio.gather(first, second)
    await dp.stop()


async def test_status_ready_and_index(plane: tuple[DataPlane, CollectorRegistry, RecordingObserver]) -> None:
    dp, _, _ = plane
    assert dp.live() and dp.ready()
    assert [(s.version, s.state) for s in dp.model_status("m")] == [
        (1, ModelState.AVAILABLE),
        (2, ModelState.AVAILABLE),
    ]
    assert [s.version for s in dp.model_status("m", label="stable")] == [1]
    assert [s.version for s in dp.model_status("m", version=2)] == [2]
    with pytest.raises(ModelNotFound):
        dp.model_status("m", version=7)
    with pytest.raises(ModelNotFound):
        dp.model_status("m", label="nope")
    with pytest.raises(ModelNotFound):
        dp.model_status("zzz")
    assert dp.model_ready("m") and dp.model_ready("m", version=1) and dp.model_ready("m", label="stable")
    assert dp.metadata("m").version == 2 and dp.metadata("m", label="stable").version == 1
    assert dp.model_names() == ["m"]
    assert [r["version"] for r in dp.repository_index()] == ["1", "2"]
    meta = dp.server_metadata()
    assert meta["name"] == "modelloop" and meta["extensions"] == [
        "binary_tensor_data",
        "model_configuration",
        "statistics",
    ]
    await dp.unload_model("m")
    assert dp.ready()  # unloaded models do not count against readiness
    assert not dp.model_ready("m")
    await dp.load_model("m")
    assert dp.model_ready("m")


async def test_not_ready_while_a_model_has_no_available_version(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)  # no model.json: FAILED
    dp, _, _ = await make_plane(tmp_path, admin_token=SecretStr("t"))
    assert not dp.ready()
    assert not dp.model_ready("m")
    with pytest.raises(ModelNotReady, match=r"model.json is missing"):
        await dp.infer(request([[1, 2, 3]]))
    assert "model_repository" in dp.server_metadata()["extensions"]
    await dp.stop()


async def test_drain_waits_for_in_flight_serves_late_arrivals_and_stop_rejects(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    slow = SlowRuntime()
    slow.release.set()
    dp, _, _ = await make_plane(tmp_path, Factory({1: lambda m: slow}))
    slow.release.clear()
    slow.started.clear()
    in_flight = asyncio.ensure_future(dp.infer(request([[1, 2, 3]])))
    await asyncio.to_thread(slow.started.wait, 5)
    drain = asyncio.ensure_future(dp.drain(grace_s=5))
    await asyncio.sleep(0.02)
    assert dp.draining and not dp.ready() and not drain.done()
    slow.release.set()
    late = await dp.infer(request([[1, 2, 3]]))  # arrived after SIGTERM: still served
    assert late.version == 1
    assert await drain == 0
    assert (await in_flight).version == 1
    await dp.stop()
    assert not dp.live()
    with pytest.raises(ModelNotReady, match="shutting down"):
        await dp.infer(request([[1, 2, 3]]))


async def test_drain_gives_up_after_the_grace_period(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_fake_version(tmp_path, "m", 1)
    slow = SlowRuntime()
    slow.release.set()
    dp, _, _ = await make_plane(tmp_path, Factory({1: lambda m: slow}))
    slow.release.clear()
    slow.started.clear()
    in_flight = asyncio.ensure_future(dp.infer(request([[1, 2, 3]])))
    await asyncio.to_thread(slow.started.wait, 5)
    grace = 0.2
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="modelloop.serving.dataplane"):
        left = await dp.drain(grace_s=grace)
    waited = time.monotonic() - started
    # It gave up: the request is still running, and drain says so.
    assert left == 1 and not in_flight.done()
    assert "drain: 1 requests still running after 0.2 s" in caplog.text
    # ... once the grace period was over, not before it and not long after (a generous bound).
    assert grace <= waited < grace + 5
    slow.release.set()
    assert (await in_flight).version == 1  # the abandoned request still finishes
    assert await dp.drain(grace_s=grace) == 0  # nothing left: a clean drain returns at once
    await dp.stop()


async def test_observer_errors_never_fail_a_request(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    dp, _, _ = await make_plane(tmp_path)

    class Broken:
        def observe(self, request: InferRequest, response: InferResponse) -> None:
            raise RuntimeError("store down")

    dp.observer = Broken()
    assert (await dp.infer(request([[1, 2, 3]]))).version == 1
    await dp.stop()


class BrokenBody:
    """A decoder whose target is fine but whose body does not decode."""

    protocol = Protocol.TFSERVING_REST

    def __init__(self, model: str, version: str | None = None, client_id: str = "") -> None:
        self.model, self.version = model, version
        self.decoded = False

    def target(self) -> tuple[str, str | None, str | None]:
        return self.model, self.version, None

    async def read(self) -> None:
        pass

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        self.decoded = True
        raise InvalidInput(f"malformed body for {metadata.name}")


async def test_rejected_requests_are_counted(
    plane: tuple[DataPlane, CollectorRegistry, RecordingObserver],
) -> None:
    dp, prom, observer = plane
    with pytest.raises(InvalidInput, match="malformed body for m"):
        await dp.handle(BrokenBody("m"))
    with pytest.raises(ModelNotFound):
        await dp.handle(BrokenBody("made-up"))
    # A decode failure counts under the resolved version; an unknown model under "" (no
    # made-up name becomes a label value).
    decoded = {"model": "m", "version": "2", "protocol": "tfserving_rest", "code": "INVALID_ARGUMENT"}
    unknown = {"model": "", "version": "", "protocol": "tfserving_rest", "code": "NOT_FOUND"}
    assert prom.get_sample_value("modelloop_requests_total", decoded) == 1
    assert prom.get_sample_value("modelloop_requests_total", unknown) == 1
    assert observer.seen == []


@pytest.mark.parametrize("version", ["²", "-1", "1e3", " 1", "٣"])
async def test_a_version_that_is_not_ascii_digits_is_invalid_before_anything_else(
    plane: tuple[DataPlane, CollectorRegistry, RecordingObserver], version: str
) -> None:
    dp, prom, _ = plane
    decoder = BrokenBody("m", version)
    with pytest.raises(InvalidInput, match="non-negative integer") as caught:
        await dp.handle(decoder)
    assert not decoder.decoded and len(caught.value.request_id) == 32
    labels = {"model": "m", "version": "", "protocol": "tfserving_rest", "code": "INVALID_ARGUMENT"}
    assert prom.get_sample_value("modelloop_requests_total", labels) == 1


@pytest.mark.parametrize(
    ("header", "body", "chosen"),
    [
        ("from-header", "from-body", "from-header"),
        (None, "from-body", "from-body"),
        ("x" * 129, "from-body", "from-body"),
        ("tab\there", None, None),
        ("", "", None),
        ("é", "ok-1", "ok-1"),
    ],
)
async def test_the_request_id_is_the_first_valid_candidate_else_a_new_one(
    plane: tuple[DataPlane, CollectorRegistry, RecordingObserver],
    header: str | None,
    body: str | None,
    chosen: str | None,
) -> None:
    dp, _, observer = plane
    response = await dp.handle(DecodedRequest(request([[1, 2, 3]], id=body or "")), client_id=header)
    if chosen is None:
        assert len(response.id) == 32 and int(response.id, 16) >= 0
    else:
        assert response.id == chosen
    assert observer.seen[-1][0].id == response.id


async def test_a_failed_request_carries_its_id(
    plane: tuple[DataPlane, CollectorRegistry, RecordingObserver],
) -> None:
    dp, _, _ = plane
    with pytest.raises(InvalidInput) as caught:
        await dp.handle(DecodedRequest(request([[1, 2]], id="body-id")), client_id="header-id")
    assert caught.value.request_id == "header-id"
    with pytest.raises(ModelNotFound) as unknown:
        await dp.handle(DecodedRequest(request([[1, 2, 3]], model="nope")), client_id="header-id")
    assert unknown.value.request_id == "header-id"


async def test_digits_end_to_end(digits_repo: Path) -> None:
    dp, _, _ = await _digits_plane(digits_repo)
    rows = np.tile(np.arange(64, dtype=np.float64) % 17, (3, 1))  # JSON numbers decode to float64
    response = await dp.infer(InferRequest("digits", {"pixels": rows}, Protocol.TFSERVING_GRPC))
    probabilities = response.outputs["probabilities"]
    assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(InvalidInput, match="has 63 features"):
        await dp.infer(InferRequest("digits", {"pixels": rows[:, :63]}, Protocol.TFSERVING_GRPC))
    await dp.stop()


async def _digits_plane(repo: Path) -> tuple[DataPlane, CollectorRegistry, RecordingObserver]:
    prom = CollectorRegistry()
    metrics = ServingMetrics(prom)
    settings = ServingSettings(repo=repo, poll_interval_s=3600, onnx_providers=["CPUExecutionProvider"])
    registry = ModelRegistry(ModelRepository(repo), settings, metrics=metrics)
    plane = DataPlane(registry, metrics)
    await plane.start()
    return plane, prom, RecordingObserver()


class SlowBody:
    """A decoder whose body arrives only when the test says so."""

    protocol = Protocol.V2_REST

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.reading = asyncio.Event()

    def target(self) -> tuple[str, str | None, str | None]:
        return "m", None, None

    async def read(self) -> None:
        self.reading.set()
        await self.arrived.wait()

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        return request([[1, 2, 3]])


async def test_a_version_that_unloads_while_a_body_arrives_is_not_chosen(tmp_path: Path) -> None:
    # The version resolves after the body is in, and nothing awaits between resolving and
    # holding it: a slow upload can neither hit "version is unloading" nor hold an unload.
    write_fake_version(tmp_path, "m", 1)
    write_fake_version(tmp_path, "m", 2)
    dp, _, _ = await make_plane(tmp_path)
    decoder = SlowBody()
    call = asyncio.create_task(dp.handle(decoder))
    await decoder.reading.wait()
    (tmp_path / "m" / "2").rename(tmp_path / "gone-2")
    await dp.registry.poll()  # the latest on disk is now 1: it loads, then 2 unloads
    await dp.registry.settle()
    assert [s.version for s in dp.model_status("m") if s.state is ModelState.AVAILABLE] == [1]
    decoder.arrived.set()
    response = await asyncio.wait_for(call, timeout=10)
    assert response.version == 1
    await dp.stop()


async def test_nan_is_served_by_default_and_refused_when_the_config_asks(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "lenient", 1)
    write_fake_version(tmp_path, "strict", 1)
    write_config(tmp_path, "strict", {"refuse_nan": True})
    dp, _, observer = await make_plane(tmp_path)
    try:
        rows = np.ones((2, 3), np.float32)
        rows[1, 2] = np.nan
        response = await dp.infer(request(rows, model="lenient"))
        assert response.version == 1 and len(observer.seen) == 1  # served, and monitoring sees the NaN
        with pytest.raises(
            InvalidInput, match=r"input 'x' has 1 NaN or infinite value\(s\), the first at index \[1, 2\]"
        ):
            await dp.infer(request(rows, model="strict"))
        rows[1, 2] = np.inf
        with pytest.raises(InvalidInput, match=r"refuses them \(refuse_nan in its config\.json\)"):
            await dp.infer(request(rows, model="strict"))
        assert (await dp.infer(request(np.ones((1, 3), np.float32), model="strict"))).version == 1
    finally:
        await dp.stop()
