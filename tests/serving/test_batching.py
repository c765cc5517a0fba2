"""DynamicBatcher: deterministic tests through the public API only."""

from __future__ import annotations

import asyncio
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


async def test_flush_on_size() -> None:
    runtime = FakeRuntime()
    # A timeout far beyond the test: only reaching max_batch_size can flush.
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=4, batch_timeout_micros=30_000_000)
    )
    start = time.monotonic()
    results = await asyncio.gather(*(batcher.predict(rows(i)) for i in range(4)))
    assert time.monotonic() - start < 5
    assert runtime.calls == [4]
    assert [float(r["sum"][0, 0]) for r in results] == [0.0, 3.0, 6.0, 9.0]
    await batcher.close()


async def test_flush_on_timeout() -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=32, batch_timeout_micros=50_000)
    )
    start = time.monotonic()
    results = await asyncio.gather(batcher.predict(rows(0)), batcher.predict(rows(1)))
    assert time.monotonic() - start >= 0.05
    assert runtime.calls == [2]
    assert [r["sum"].shape for r in results] == [(1, 1), (1, 1)]
    await batcher.close()


async def test_split_keeps_order_and_row_counts() -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=10, batch_timeout_micros=30_000_000)
    )
    sizes = [3, 1, 4, 2]
    starts = [0, 3, 4, 8]
    results = await asyncio.gather(*(batcher.predict(rows(s, n)) for s, n in zip(starts, sizes, strict=True)))
    assert runtime.calls == [10]
    for s, n, result in zip(starts, sizes, results, strict=True):
        np.testing.assert_array_equal(result["echo"], rows(s, n)["x"])
        assert result["sum"].shape == (n, 1)
    await batcher.close()


async def test_request_that_does_not_fit_goes_to_the_next_batch() -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.predict, BatchingSettings(max_batch_size=4, batch_timeout_micros=20_000))
    results = await asyncio.gather(batcher.predict(rows(0, 3)), batcher.predict(rows(3, 3)))
    assert runtime.calls == [3, 3]
    np.testing.assert_array_equal(results[1]["echo"], rows(3, 3)["x"])
    await batcher.close()


async def test_error_fans_out_to_every_waiter() -> None:
    runtime = ErrorRuntime()
    batcher = DynamicBatcher(
        runtime.predict,
        BatchingSettings(max_batch_size=3, batch_timeout_micros=30_000_000),
        model="m",
        version=7,
    )
    results = await asyncio.gather(*(batcher.predict(rows(i)) for i in range(3)), return_exceptions=True)
    assert runtime.calls == [3]
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


async def test_wrong_output_rows_fail_the_batch() -> None:
    def bad(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.zeros((1, 1), np.float32)}

    batcher = DynamicBatcher(bad, BatchingSettings(max_batch_size=2, batch_timeout_micros=30_000_000))
    results = await asyncio.gather(batcher.predict(rows(0)), batcher.predict(rows(1)), return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) and "for a batch of 2 rows" in str(r) for r in results)
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
    runtime = FakeRuntime()
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=3, batch_timeout_micros=100_000)
    )
    a = asyncio.ensure_future(batcher.predict(rows(0)))
    b = asyncio.ensure_future(batcher.predict(rows(1)))
    c = asyncio.ensure_future(batcher.predict(rows(2)))
    await asyncio.sleep(0)
    b.cancel()
    result_a, result_c = await asyncio.gather(a, c)
    assert b.cancelled()
    # The cancelled request left the queue before the batch formed.
    assert runtime.calls == [2]
    assert float(result_a["sum"][0, 0]) == 0.0
    assert float(result_c["sum"][0, 0]) == 6.0
    assert batcher.queued_rows == 0
    await batcher.close()


async def test_cancel_while_running_does_not_break_the_batch() -> None:
    runtime = SlowRuntime()
    batcher = DynamicBatcher(
        runtime.predict, BatchingSettings(max_batch_size=2, batch_timeout_micros=30_000_000)
    )
    a = asyncio.ensure_future(batcher.predict(rows(0)))
    b = asyncio.ensure_future(batcher.predict(rows(1)))
    await asyncio.to_thread(runtime.started.wait, 5)
    a.cancel()
    runtime.release.set()
    result_b = await b
    assert a.cancelled()
    assert float(result_b["sum"][0, 0]) == 3.0
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
    runtime = FakeRuntime()
    batcher = DynamicBatcher(
        runtime.predict,
        BatchingSettings(max_batch_size=3, batch_timeout_micros=30_000_000),
        metrics=ServingMetrics(registry),
        model="m",
        version=2,
    )
    await asyncio.gather(*(batcher.predict(rows(i)) for i in range(3)))
    labels = {"model": "m", "version": "2"}
    assert registry.get_sample_value("modelloop_batch_size_count", labels) == 1
    assert registry.get_sample_value("modelloop_batch_size_sum", labels) == 3
    assert registry.get_sample_value("modelloop_queue_duration_seconds_count", labels) == 3
    await batcher.close()
