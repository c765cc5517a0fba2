"""The statistics extension's bookkeeping, and the data plane's answer over real requests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from modelloop.serving.errors import InvalidInput, ModelNotFound
from modelloop.serving.statistics import InferenceStatistics

from .fakes import write_fake_version
from .test_dataplane import make_plane, request
from .test_registry import write_config


def test_sums_per_version_and_batch_size() -> None:
    stats = InferenceStatistics()
    stats.record_execution("m", 1, rows=4, seconds=0.002, ok=True)
    stats.record_execution("m", 1, rows=4, seconds=0.001, ok=True)
    stats.record_execution("m", 1, rows=1, seconds=0.0005, ok=False)
    stats.record_queue("m", 1, 0.000_25)
    stats.record_request("m", 1, ok=True, seconds=0.003)
    stats.record_request("m", 1, ok=False, seconds=0.001)
    stats.record_request("m", 2, ok=True, seconds=0.001)
    one = stats.snapshot("m", 1)
    assert (one.inference_count, one.execution_count) == (8, 3)
    assert (one.success.count, one.success.ns) == (1, 3_000_000)
    assert (one.fail.count, one.fail.ns) == (1, 1_000_000)
    assert (one.queue.count, one.queue.ns) == (1, 250_000)
    assert (one.compute_infer.count, one.compute_infer.ns) == (3, 3_500_000)
    assert one.last_inference >= time.time_ns() // 1_000_000 - 10_000
    body = one.as_dict()
    assert body["version"] == "1"
    assert body["batch_stats"] == [
        {
            "batch_size": 1,
            "compute_input": {"count": 1, "ns": 0},
            "compute_infer": {"count": 1, "ns": 500_000},
            "compute_output": {"count": 1, "ns": 0},
        },
        {
            "batch_size": 4,
            "compute_input": {"count": 2, "ns": 0},
            "compute_infer": {"count": 2, "ns": 3_000_000},
            "compute_output": {"count": 2, "ns": 0},
        },
    ]
    assert body["inference_stats"]["compute_input"] == {"count": 3, "ns": 0}
    assert stats.versions("m") == [1, 2] and stats.versions("other") == []
    # A snapshot is a copy: later figures do not change it.
    stats.record_request("m", 1, ok=True, seconds=1.0)
    assert one.success.count == 1
    fresh = stats.snapshot("never", 7).as_dict()
    assert (fresh["inference_count"], fresh["last_inference"], fresh["batch_stats"]) == (0, 0, [])


async def test_the_data_plane_reports_what_its_requests_did(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    write_fake_version(tmp_path, "m", 2)
    write_config(tmp_path, "m", {"version_policy": {"all": {}}})
    dp, prom, _ = await make_plane(tmp_path, batching={"max_batch_size": 4, "batch_timeout_micros": 0})
    try:
        await dp.infer(request([[1, 2, 3], [4, 5, 6]]))
        await dp.infer(request([[1, 2, 3]], version=1))
        with pytest.raises(InvalidInput):
            await dp.infer(request([[1, 2]], version=1))  # resolved, then refused: a failure of v1
        with pytest.raises(ModelNotFound):
            await dp.infer(request([[1, 2, 3]], model="nope"))  # never resolved: nobody's figure

        listed = {(s.name, s.version) for s in dp.statistics()}
        assert listed == {("m", 1), ("m", 2)}
        [two] = dp.statistics("m", 2)
        assert (two.inference_count, two.execution_count, two.success.count, two.fail.count) == (2, 1, 1, 0)
        assert list(two.batches) == [2] and two.success.ns > 0 and two.compute_infer.ns > 0
        assert two.queue.count == 1
        [one] = dp.statistics("m", 1)
        assert (one.inference_count, one.success.count, one.fail.count) == (1, 1, 1)
        # The same observations as the Prometheus metrics, never a second count.
        duration = prom.get_sample_value(
            "modelloop_request_duration_seconds_sum", {"model": "m", "version": "2", "protocol": "v2_rest"}
        )
        assert duration == pytest.approx(two.success.ns / 1e9, rel=1e-6)
        assert [s.version for s in dp.statistics("m")] == [1, 2]

        with pytest.raises(ModelNotFound, match="'nope'"):
            dp.statistics("nope")
        with pytest.raises(ModelNotFound, match="no version 9"):
            dp.statistics("m", 9)
    finally:
        await dp.stop()


async def test_batches_are_counted_by_their_size(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    dp, _, _ = await make_plane(
        tmp_path, batching={"max_batch_size": 8, "batch_timeout_micros": 50_000, "num_batch_threads": 1}
    )
    try:
        rows = np.ones((1, 3), dtype=np.float32)
        await asyncio.gather(*(dp.infer(request(rows)) for _ in range(6)))
        [stats] = dp.statistics("m", 1)
        assert stats.inference_count == 6 and stats.success.count == 6
        assert sum(size * b.compute_infer.count for size, b in stats.batches.items()) == 6
        assert stats.execution_count == sum(b.compute_infer.count for b in stats.batches.values())
    finally:
        await dp.stop()
