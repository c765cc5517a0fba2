"""DynamicBatcher: deterministic tests through the public API only."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelloop.serving.batching import DynamicBatcher
from modelloop.serving.errors import InferenceFailed, ModelNotReady, QueueFull
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.settings import BatchingSettings

from .fakes import ErrorRuntime, FakeRuntime, SlowRuntime


def rows(start: int, n: int = 1) -> dict[str, np.ndarray]:
    """``n`` rows whose values identify them: row i is [i, i, i]."""
    values = np.arange(start, start + n, dtype=np.float32)
    return {"x": np.repeat(values[:, None], 3, axis=1)}


async def under_load(batcher: DynamicBatcher, runtime: SlowRuntime) -> asyncio.Future[dict[str, np.ndarray]]:
    """Puts the batcher under load: one call holds its thread until ``runtime.release`` is set.

    An idle batcher runs a request at once, so batches form only from the requests that
    queue behind a running one.
    """
    first = asyncio.ensure_future(batcher.predict(rows(100)))
    await asyncio.to_thread(runtime.started.wait, 5)
    return first


async def test_an_idle_batcher_runs_a_request_at_once() -> None:
    registry = CollectorRegistry()
    runtime = FakeRuntime()
    # A timeout far beyond the test: an idle request must not wait for it.
    settings = BatchingSettings(max_batch_size=32, batch_timeout_micros=30_000_000)
    batcher = DynamicBatcher(
        runtime.predict, settings, metrics=ServingMetrics(registry), model="m", version=1
    )
    start = time.monotonic()
    for i in range(3):
        assert float((await batcher.predict(rows(i)))["sum"][0, 0]) == 3.0 * i
    assert time.monotonic() - start < 5
    assert runtime.calls == [1, 1, 1]
    labels = {"model": "m", "version": "1"}
    assert registry.get_sample_value("modelloop_queue_duration_seconds_sum", labels) == 0.0
    assert registry.get_sample_value("modelloop_batch_size_count", labels) == 3
    await batcher.close()


async def test_flush_on_size() -> None:
    runtime = SlowRuntime()
    # A timeout far beyond the test: only reaching max_batch_size can flush.
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=4, batch_timeout_micros=30_000_000)
    )
    first = await under_load(batcher, runtime)
    start = time.monotonic()
    pending = asyncio.gather(*(batcher.predict(rows(i)) for i in range(4)))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 4
    runtime.release.set()
    results = await pending
    await first
    assert time.monotonic() - start < 5
    assert runtime.calls == [1, 4]
    assert [float(r["sum"][0, 0]) for r in results] == [0.0, 3.0, 6.0, 9.0]
    await batcher.close()


async def test_flush_on_timeout() -> None:
    runtime = SlowRuntime()
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=32, batch_timeout_micros=50_000)
    )
    first = await under_load(batcher, runtime)
    start = time.monotonic()
    pending = asyncio.gather(batcher.predict(rows(0)), batcher.predict(rows(1)))
    await asyncio.sleep(0)
    runtime.release.set()
    results = await pending
    await first
    assert time.monotonic() - start >= 0.05
    assert runtime.calls == [1, 2]
    assert [r["sum"].shape for r in results] == [(1, 1), (1, 1)]
    await batcher.close()


async def test_split_keeps_order_and_row_counts() -> None:
    runtime = SlowRuntime()
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=10, batch_timeout_micros=30_000_000)
    )
    first = await under_load(batcher, runtime)
    sizes = [3, 1, 4, 2]
    starts = [0, 3, 4, 8]
    pending = asyncio.gather(*(batcher.predict(rows(s, n)) for s, n in zip(starts, sizes, strict=True)))
    await asyncio.sleep(0)
    runtime.release.set()
    results = await pending
    await first
    assert runtime.calls == [1, 10]
    for s, n, result in zip(starts, sizes, results, strict=True):
        np.testing.assert_array_equal(result["echo"], rows(s, n)["x"])
        assert result["sum"].shape == (n, 1)
    await batcher.close()


async def test_request_that_does_not_fit_goes_to_the_next_batch() -> None:
    runtime = SlowRuntime()
    batcher = DynamicBatcher(runtime.predict, BatchingSettings(max_batch_size=4, batch_timeout_micros=20_000))
    first = await under_load(batcher, runtime)
    pending = asyncio.gather(batcher.predict(rows(0, 3)), batcher.predict(rows(3, 3)))
    await asyncio.sleep(0)
    runtime.release.set()
    results = await pending
    await first
    assert runtime.calls == [1, 3, 3]
    np.testing.assert_array_equal(results[1]["echo"], rows(3, 3)["x"])
    await batcher.close()


class GatedErrorRuntime(SlowRuntime):
    """Blocks until released, then raises on every call."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        self.release.wait(self.delay)
        self.calls.append(int(inputs["x"].shape[0]))
        raise RuntimeError("boom: the model exploded")


async def test_error_fans_out_to_every_waiter() -> None:
    runtime = GatedErrorRuntime()
    batcher = DynamicBatcher(
        runtime.predict,
        BatchingSettings(max_batch_size=3, batch_timeout_micros=30_000_000),
        model="m",
        version=7,
    )
    first = await under_load(batcher, runtime)  # type: ignore[arg-type]
    pending = asyncio.gather(*(batcher.predict(rows(i)) for i in range(3)), return_exceptions=True)
    await asyncio.sleep(0)
    runtime.release.set()
    results = await pending
    with pytest.raises(InferenceFailed):
        await first
    # The batch failed, so each request ran alone, and failed alone.
    assert runtime.calls == [1, 3, 1, 1, 1]
    assert all(isinstance(r, InferenceFailed) for r in results)
    assert len({id(r) for r in results}) == 3
    assert "boom: the model exploded" in str(results[0])
    assert "'m' version 7" in str(results[0])
    await batcher.close()


async def test_batcher_keeps_serving_after_an_error() -> None:
    calls = {"n": 0}
    runtime = FakeRuntime()

    def flaky(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first call fails")
        return runtime.predict(inputs)

    batcher = DynamicBatcher(flaky, BatchingSettings(max_batch_size=1))
    with pytest.raises(InferenceFailed, match="first call fails"):
        await batcher.predict(rows(0))
    assert float((await batcher.predict(rows(1)))["sum"][0, 0]) == 3.0
    await batcher.close()


async def test_wrong_output_rows_fail_the_batch_and_each_request_runs_alone() -> None:
    gate = SlowRuntime()

    def bad(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.predict(inputs)
        return {"y": np.zeros((1, 1), np.float32)}

    batcher = DynamicBatcher(bad, BatchingSettings(max_batch_size=2, batch_timeout_micros=30_000_000))
    first = asyncio.ensure_future(batcher.predict(rows(100, 2)))
    await asyncio.to_thread(gate.started.wait, 5)
    pending = asyncio.gather(batcher.predict(rows(0)), batcher.predict(rows(1)), return_exceptions=True)
    await asyncio.sleep(0)
    gate.release.set()
    results = await pending
    # One row in, one row out: alone, each request gets a well-formed answer.
    assert [r["y"].shape for r in results] == [(1, 1), (1, 1)]
    with pytest.raises(InferenceFailed, match="for a batch of 2 rows"):
        await first
    await batcher.close()


class PoisonRowRuntime(SlowRuntime):
    """Fails on any batch holding a row of -1, quoting the rows it saw (as models do)."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] == -1).any():
            self.calls.append(int(inputs["x"].shape[0]))
            raise ValueError(f"could not use the rows {inputs['x'][:, 0].tolist()}")
        return super().predict(inputs)


async def test_a_failing_request_fails_alone_and_its_data_reaches_no_one_else() -> None:
    runtime = PoisonRowRuntime()
    # The three requests fill a batch of 4 rows, which runs when the thread is free (the
    # long timeout never has to pass).
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=4, batch_timeout_micros=30_000_000)
    )
    first = await under_load(batcher, runtime)
    poison = {"x": np.full((1, 3), -1.0, np.float32)}
    pending = asyncio.gather(
        batcher.predict(rows(7)), batcher.predict(poison), batcher.predict(rows(9, 2)), return_exceptions=True
    )
    await asyncio.sleep(0)
    runtime.release.set()
    good, bad, other = await pending
    await first
    # The batch of four rows failed; each request then ran alone.
    assert runtime.calls == [1, 4, 1, 1, 2]
    np.testing.assert_array_equal(good["echo"], rows(7)["x"])
    np.testing.assert_array_equal(other["echo"], rows(9, 2)["x"])
    assert isinstance(bad, InferenceFailed)
    assert "[-1.0]" in str(bad) and "7.0" not in str(bad) and "9.0" not in str(bad)
    assert "batch of 1 rows" in str(bad)
    await batcher.close()


async def test_an_inline_batch_that_fails_is_retried_request_by_request() -> None:
    runtime = PoisonRowRuntime()
    runtime.release.set()
    settings = BatchingSettings(max_batch_size=4, batch_timeout_micros=30_000_000, inline_max_micros=50_000)
    batcher = DynamicBatcher(runtime.predict, settings)
    for i in range(20):
        await batcher.predict(rows(i))
    assert batcher.runs_inline
    runtime.calls.clear()
    poison = {"x": np.full((1, 3), -1.0, np.float32)}
    good, bad = await asyncio.gather(
        batcher.predict(rows(5)), batcher.predict(poison), return_exceptions=True
    )
    assert runtime.calls == [2, 1, 1]  # the batch, then each request alone
    np.testing.assert_array_equal(good["echo"], rows(5)["x"])
    assert isinstance(bad, InferenceFailed) and "5.0" not in str(bad)
    await batcher.close()


async def test_queue_full_rejects_at_once() -> None:
    runtime = SlowRuntime()
    # One thread, one batch of 2 rows may wait: capacity = 1 * 2 rows.
    settings = BatchingSettings(max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=1)
    batcher = DynamicBatcher(runtime.predict, settings, model="m", version=1)
    running = asyncio.ensure_future(batcher.predict(rows(0, 2)))
    await asyncio.to_thread(runtime.started.wait, 5)  # the first batch holds the only thread
    queued = asyncio.ensure_future(batcher.predict(rows(2, 2)))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 2
    with pytest.raises(QueueFull, match="queue of model 'm' version 1 is full"):
        await batcher.predict(rows(4))
    runtime.release.set()
    _, second = await asyncio.gather(running, queued)
    np.testing.assert_array_equal(second["echo"], rows(2, 2)["x"])
    assert runtime.calls == [2, 2]
    # Space is free again.
    await batcher.predict(rows(5))
    await batcher.close()


async def test_cancelled_waiter_does_not_break_the_batch() -> None:
    runtime = SlowRuntime()
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=3, batch_timeout_micros=100_000)
    )
    first = await under_load(batcher, runtime)
    a = asyncio.ensure_future(batcher.predict(rows(0)))
    b = asyncio.ensure_future(batcher.predict(rows(1)))
    c = asyncio.ensure_future(batcher.predict(rows(2)))
    await asyncio.sleep(0)
    b.cancel()
    runtime.release.set()
    result_a, result_c = await asyncio.gather(a, c)
    await first
    assert b.cancelled()
    # The cancelled request left the queue before the batch formed.
    assert runtime.calls == [1, 2]
    assert float(result_a["sum"][0, 0]) == 0.0
    assert float(result_c["sum"][0, 0]) == 6.0
    assert batcher.queued_rows == 0
    await batcher.close()


async def test_cancel_while_running_does_not_break_the_batcher() -> None:
    runtime = SlowRuntime()
    # One-row batches: b is a full batch, queued behind a, and goes once a's thread is free.
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=1, batch_timeout_micros=30_000_000)
    )
    a = asyncio.ensure_future(batcher.predict(rows(0)))
    b = asyncio.ensure_future(batcher.predict(rows(1)))
    await asyncio.to_thread(runtime.started.wait, 5)
    a.cancel()
    runtime.release.set()
    result_b = await b
    assert a.cancelled()
    assert float(result_b["sum"][0, 0]) == 3.0
    assert runtime.calls == [1, 1]  # a's call ran to the end on its thread
    await batcher.close()


async def test_disabled_batching_runs_each_request_alone() -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.predict, BatchingSettings(enabled=False, num_batch_threads=2))
    results = await asyncio.gather(*(batcher.predict(rows(i, 2)) for i in range(3)))
    assert sorted(runtime.calls) == [2, 2, 2]
    np.testing.assert_array_equal(results[2]["echo"], rows(2, 2)["x"])
    await batcher.close()


async def test_disabled_batching_wraps_errors() -> None:
    batcher = DynamicBatcher(ErrorRuntime().predict, BatchingSettings(enabled=False))
    with pytest.raises(InferenceFailed, match="boom"):
        await batcher.predict(rows(0))
    await batcher.close()


async def test_closed_batcher_rejects() -> None:
    batcher = DynamicBatcher(FakeRuntime().predict, BatchingSettings())
    await batcher.predict(rows(0))
    await batcher.close()
    with pytest.raises(ModelNotReady, match="unloading"):
        await batcher.predict(rows(0))


async def test_records_batch_size_and_queue_time() -> None:
    registry = CollectorRegistry()
    runtime = SlowRuntime()
    batcher = DynamicBatcher(
        runtime.predict,
        BatchingSettings(max_batch_size=3, batch_timeout_micros=30_000_000),
        metrics=ServingMetrics(registry),
        model="m",
        version=2,
    )
    first = await under_load(batcher, runtime)
    pending = asyncio.gather(*(batcher.predict(rows(i)) for i in range(3)))
    await asyncio.sleep(0)
    runtime.release.set()
    await pending
    await first
    labels = {"model": "m", "version": "2"}
    assert registry.get_sample_value("modelloop_batch_size_count", labels) == 2
    assert registry.get_sample_value("modelloop_batch_size_sum", labels) == 4
    assert registry.get_sample_value("modelloop_queue_duration_seconds_count", labels) == 4
    # The three queued behind the running call waited for it.
    assert registry.get_sample_value("modelloop_queue_duration_seconds_sum", labels) > 0
    await batcher.close()


class ThreadRecorder(FakeRuntime):
    """A FakeRuntime that records the thread of every call, and can be made slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.threads: list[int] = []

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().predict(inputs)


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_tiny_model_runs_inline_once_its_calls_are_measured(enabled: bool) -> None:
    runtime = ThreadRecorder()
    batcher = DynamicBatcher(runtime.predict, BatchingSettings(enabled=enabled, inline_max_micros=50_000))
    loop_thread = threading.get_ident()
    for i in range(40):
        await batcher.predict(rows(i))
    assert batcher.runs_inline
    # Measured first on the batch threads, then on the event loop.
    assert runtime.threads[0] != loop_thread
    assert runtime.threads[-1] == loop_thread
    await batcher.close()


async def test_an_inline_model_batches_the_requests_of_one_loop_turn() -> None:
    runtime = ThreadRecorder()
    # A timeout far beyond the test: inline batches never wait for it.
    settings = BatchingSettings(max_batch_size=4, batch_timeout_micros=30_000_000, inline_max_micros=50_000)
    batcher = DynamicBatcher(runtime.predict, settings)
    for i in range(20):
        await batcher.predict(rows(i))
    assert batcher.runs_inline
    runtime.calls.clear()
    start = time.monotonic()
    results = await asyncio.gather(*(batcher.predict(rows(i)) for i in range(6)))
    assert time.monotonic() - start < 5
    # Six requests arrived in one turn: one full batch of four, then the other two.
    assert runtime.calls == [4, 2]
    assert [float(r["sum"][0, 0]) for r in results] == [3.0 * i for i in range(6)]
    await batcher.predict(rows(0))
    assert runtime.calls == [4, 2, 1]
    await batcher.close()


async def test_slow_models_and_inline_zero_stay_on_threads() -> None:
    slow = ThreadRecorder(delay_s=0.002)
    batcher = DynamicBatcher(slow.predict, BatchingSettings(inline_max_micros=1_000))
    never = ThreadRecorder()
    off = DynamicBatcher(never.predict, BatchingSettings(inline_max_micros=0))
    loop_thread = threading.get_ident()
    for i in range(24):
        await batcher.predict(rows(i))
        await off.predict(rows(i))
    assert not batcher.runs_inline and not off.runs_inline
    assert loop_thread not in slow.threads and loop_thread not in never.threads
    await batcher.close()
    await off.close()


async def test_an_inline_error_is_an_inference_failure() -> None:
    calls = {"n": 0}
    runtime = FakeRuntime()

    def fails_later(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("late failure")
        return runtime.predict(inputs)

    batcher = DynamicBatcher(fails_later, BatchingSettings(inline_max_micros=50_000))
    for i in range(29):
        await batcher.predict(rows(i))
    assert batcher.runs_inline
    with pytest.raises(InferenceFailed, match="late failure"):
        await batcher.predict(rows(0))
    assert float((await batcher.predict(rows(1)))["sum"][0, 0]) == 3.0
    await batcher.close()
