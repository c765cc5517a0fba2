"""ServingMetrics on a fresh CollectorRegistry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from modelloop.errors import ErrorCode
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.types import Protocol


def test_request_counter_and_histogram() -> None:
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    metrics.observe_request("digits", 3, Protocol.TFSERVING_GRPC, "OK", 0.002)
    metrics.observe_request("digits", 3, Protocol.TFSERVING_GRPC, "OK", 0.004)
    metrics.observe_request("digits", None, "v2_rest", ErrorCode.NOT_FOUND, 0.001)
    ok = {"model": "digits", "version": "3", "protocol": "tfserving_grpc", "code": "OK"}
    assert registry.get_sample_value("modelloop_requests_total", ok) == 2
    not_found = {"model": "digits", "version": "", "protocol": "v2_rest", "code": "NOT_FOUND"}
    assert registry.get_sample_value("modelloop_requests_total", not_found) == 1
    duration = {"model": "digits", "version": "3", "protocol": "tfserving_grpc"}
    assert registry.get_sample_value("modelloop_request_duration_seconds_count", duration) == 2
    assert abs(registry.get_sample_value("modelloop_request_duration_seconds_sum", duration) - 0.006) < 1e-9


def test_batch_queue_and_model_metrics() -> None:
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    metrics.observe_batch("m", 1, 8)
    metrics.observe_queue("m", 1, 0.0005)
    metrics.set_versions_loaded("m", 2)
    metrics.count_load_failure("m")
    metrics.count_load_failure("m")
    labels = {"model": "m", "version": "1"}
    assert registry.get_sample_value("modelloop_batch_size_sum", labels) == 8
    assert registry.get_sample_value("modelloop_batch_size_bucket", {**labels, "le": "8.0"}) == 1
    assert registry.get_sample_value("modelloop_queue_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("modelloop_model_versions_loaded", {"model": "m"}) == 2
    assert registry.get_sample_value("modelloop_model_load_failures_total", {"model": "m"}) == 2


def test_registries_are_independent() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    ServingMetrics(first).count_load_failure("m")
    ServingMetrics(second)
    assert second.get_sample_value("modelloop_model_load_failures_total", {"model": "m"}) is None
    text = generate_latest(first).decode()
    for name in (
        "modelloop_requests_total",
        "modelloop_request_duration_seconds",
        "modelloop_batch_size",
        "modelloop_queue_duration_seconds",
        "modelloop_model_versions_loaded",
        "modelloop_model_load_failures_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text


def test_the_worker_pool_state_is_exported(tmp_path) -> None:
    from modelloop.serving.metrics import WorkerPoolCollector, write_worker_pool_state

    registry = CollectorRegistry()
    registry.register(WorkerPoolCollector(tmp_path))
    assert registry.get_sample_value("modelloop_workers", {"state": "running"}) is None  # no file yet
    write_worker_pool_state(tmp_path, 4, 3, {"0": 0, "1": 2})
    assert registry.get_sample_value("modelloop_workers", {"state": "configured"}) == 4
    assert registry.get_sample_value("modelloop_workers", {"state": "running"}) == 3
    assert registry.get_sample_value("modelloop_worker_restarts_total", {"worker": "1"}) == 2
    assert not list(tmp_path.glob("*.tmp"))
