"""Tracing over the real data plane: the spans of REST and gRPC calls, read from the SDK's memory.

The stack is the production one with fake runtimes (``edge_support``); the SDK's
``InMemorySpanExporter`` collects what the request path makes. The spans of one call
are checked by name, parent, trace id, links and attributes: the request span under the
client's ``traceparent``, decode, queue, batch and encode under it, one batch span linked
to every request it ran, and the prediction logger's write span linked to the requests
it logged. With tracing off nothing is made. The ``OTEL_*`` reading is tested here as a pure
function; a real server exporting over OTLP/HTTP is ``tests/e2e/test_tracing_e2e.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelloop.serving import tracing
from modelloop.serving.dataplane import DataPlane
from modelloop.serving.predlog import PredictionLogger, decode_segment
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_predict_pb2 as predict_pb2
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_prediction_service_pb2_grpc as prediction_service_pb2_grpc,
)
from modelloop.serving.rest.app import create_app
from modelloop.telemetry import endpoint_problem, plan_tracing

from .edge_support import (
    EdgeStack,
    GatedRuntime,
    RuntimeFactory,
    failing,
    grpc_channel,
    model_infer_request,
    serve,
    write_digits,
)

ROW = [float(i % 17) for i in range(64)]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for one test; off again after it."""
    # The monitoring writer uses the process's provider, as in a server. It can be set
    # once per process; this module is its only user in the test run.
    if trace.get_tracer_provider() is not PROVIDER:
        trace.set_tracer_provider(PROVIDER)
    assert trace.get_tracer_provider() is PROVIDER
    EXPORTER.clear()
    tracing.enable(PROVIDER.get_tracer("test"))
    try:
        yield EXPORTER
    finally:
        tracing.disable()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_digits(repo, (1, 2))
    return repo


@pytest.fixture
async def stack(repo: Path) -> AsyncIterator[EdgeStack]:
    async with serve(repo) as stack:
        yield stack


def client_for(dataplane: DataPlane, stack: EdgeStack) -> httpx.AsyncClient:
    app = create_app(dataplane, stack.settings, stack.prometheus)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name == name]


def one(finished: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = named(finished, name)
    assert len(found) == 1, [s.name for s in finished]
    return found[0]


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def assert_request_tree(finished: tuple[ReadableSpan, ...], request_name: str, protocol: str) -> ReadableSpan:
    """The spans of one lone request under the client's traceparent; returns the request span."""
    request = one(finished, request_name)
    assert hex_trace(request) == TRACE_ID
    assert request.parent is not None and f"{request.parent.span_id:016x}" == PARENT_ID
    assert request.parent.is_remote
    assert request.kind == trace.SpanKind.SERVER
    assert request.attributes is not None and request.context is not None
    assert request.attributes[tracing.MODEL] == "digits"
    assert request.attributes[tracing.VERSION] == 2
    assert request.attributes[tracing.PROTOCOL] == protocol
    assert request.attributes[tracing.CODE] == "OK"
    for name in (tracing.DECODE, tracing.QUEUE, tracing.BATCH, tracing.ENCODE):
        child = one(finished, name)
        assert hex_trace(child) == TRACE_ID, name
        assert child.parent is not None and child.parent.span_id == request.context.span_id, name
        attributes = child.attributes or {}
        assert attributes[tracing.MODEL] == "digits" and attributes[tracing.VERSION] == 2, name
    for name in (tracing.DECODE, tracing.ENCODE):
        assert (one(finished, name).attributes or {})[tracing.PROTOCOL] == protocol
    batch, queue = one(finished, tracing.BATCH), one(finished, tracing.QUEUE)
    assert [link.context.span_id for link in batch.links] == [request.context.span_id]
    assert (batch.attributes or {})[tracing.BATCH_SIZE] == 1
    assert (queue.attributes or {})[tracing.BATCH_SIZE] == 1
    assert batch.context is not None
    assert [link.context.span_id for link in queue.links] == [batch.context.span_id]
    # The spans nest in time: decode, then queue and batch, then encode, inside the request.
    decode, encode = one(finished, tracing.DECODE), one(finished, tracing.ENCODE)
    assert request.start_time is not None and request.end_time is not None
    assert decode.end_time is not None and encode.start_time is not None
    assert request.start_time <= decode.start_time <= decode.end_time <= batch.start_time  # type: ignore[operator]
    assert batch.end_time <= encode.start_time <= encode.end_time <= request.end_time  # type: ignore[operator]
    return request


async def test_rest_predict_continues_the_callers_trace(
    spans: InMemorySpanExporter, stack: EdgeStack
) -> None:
    async with client_for(stack.dataplane, stack) as client:
        response = await client.post(
            "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"traceparent": TRACEPARENT}
        )
    assert response.status_code == 200, response.text
    finished = spans.get_finished_spans()
    request = assert_request_tree(finished, "POST /v1/models/{model}:predict", "tfserving_rest")
    attributes = request.attributes or {}
    assert attributes["http.response.status_code"] == 200
    assert attributes[tracing.REQUEST_ID] == response.headers["x-request-id"]
    assert len(finished) == 5, [s.name for s in finished]


async def test_rest_infer_without_traceparent_starts_a_trace(
    spans: InMemorySpanExporter, stack: EdgeStack
) -> None:
    body = {"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": ROW * 2}]}
    async with client_for(stack.dataplane, stack) as client:
        ok = await client.post("/v2/models/digits/versions/1/infer", json=body)
        # A malformed traceparent is ignored: the request starts a trace of its own.
        bad = await client.post(
            "/v2/models/digits/infer", json=body, headers={"traceparent": "00-nothex-zz-01"}
        )
    assert ok.status_code == bad.status_code == 200
    finished = spans.get_finished_spans()
    requests = named(finished, "POST /v2/models/{model}/infer")
    assert len(requests) == 2 and all(r.parent is None for r in requests)
    assert [(r.attributes or {})[tracing.VERSION] for r in requests] == [1, 2]
    assert len({hex_trace(r) for r in requests}) == 2
    assert {(b.attributes or {})[tracing.BATCH_SIZE] for b in named(finished, tracing.BATCH)} == {2}


async def test_grpc_predict_and_model_infer_read_traceparent_metadata(
    spans: InMemorySpanExporter, stack: EdgeStack
) -> None:
    metadata = (("traceparent", TRACEPARENT),)
    async with grpc_channel(stack) as (_, channel):
        predict = predict_pb2.PredictRequest()
        predict.model_spec.name = "digits"
        tensor = predict.inputs["pixels"]
        tensor.dtype = 1  # DT_FLOAT
        tensor.tensor_shape.dim.add(size=1)
        tensor.tensor_shape.dim.add(size=64)
        tensor.float_val.extend(ROW)
        await prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict, metadata=metadata)
        finished = spans.get_finished_spans()
        assert_request_tree(finished, "tensorflow.serving.PredictionService/Predict", "tfserving_grpc")
        spans.clear()
        pixels = np.array([ROW], np.float32)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(model_infer_request(pixels), metadata=metadata)
        finished = spans.get_finished_spans()
        request = assert_request_tree(finished, "inference.GRPCInferenceService/ModelInfer", "v2_grpc")
        assert (request.attributes or {})["rpc.method"] == "ModelInfer"
        # Errors still map to their status inside the span, which records the code.
        spans.clear()
        unknown = model_infer_request(pixels)
        unknown.model_name = "nope"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(unknown, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        failed = one(spans.get_finished_spans(), "inference.GRPCInferenceService/ModelInfer")
        assert (failed.attributes or {})[tracing.CODE] == "NOT_FOUND"
        assert failed.status.status_code == trace.StatusCode.UNSET


async def test_a_batch_span_links_every_request_it_ran(spans: InMemorySpanExporter, repo: Path) -> None:
    # The first request holds the only batch thread; the next three queue and run as one batch.
    factory = RuntimeFactory({("digits", 2): GatedRuntime})
    batching = {"max_batch_size": 8, "batch_timeout_micros": 200_000}
    async with serve(repo, factory, batching=batching) as stack, client_for(stack.dataplane, stack) as client:
        gate = stack.factory.runtime("digits", 2)
        batcher = stack.dataplane.registry.resolve("digits").batcher

        def post(i: int) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(
                client.post(
                    "/v1/models/digits:predict",
                    json={"instances": [ROW]},
                    headers={"traceparent": f"00-{i + 1:032x}-{PARENT_ID}-01"},
                )
            )

        first = post(0)
        try:
            await asyncio.to_thread(gate.started.wait, 10)
            waiting = [post(i) for i in (1, 2, 3)]
            async with asyncio.timeout(10):
                while batcher.queued_rows < 3:
                    await asyncio.sleep(0.001)
        finally:
            gate.release.set()
        responses = [await first, *[await task for task in waiting]]
    assert [r.status_code for r in responses] == [200] * 4
    finished = spans.get_finished_spans()
    requests = {hex_trace(r): r for r in named(finished, "POST /v1/models/{model}:predict")}
    assert len(requests) == 4
    batches = sorted(named(finished, tracing.BATCH), key=lambda s: (s.attributes or {})[tracing.BATCH_SIZE])
    assert [(b.attributes or {})[tracing.BATCH_REQUESTS] for b in batches] == [1, 3]
    big = batches[1]
    members = [requests[f"{i + 1:032x}"] for i in (1, 2, 3)]
    linked = {link.context.span_id for link in big.links}
    assert linked == {m.context.span_id for m in members if m.context is not None}
    # Its parent is the first request in it; each member's queue span links back to it.
    assert big.parent is not None and big.parent.span_id in linked
    assert big.context is not None
    for member in members:
        assert member.context is not None
        queues = [
            q
            for q in named(finished, tracing.QUEUE)
            if q.parent is not None and q.parent.span_id == member.context.span_id
        ]
        assert len(queues) == 1
        assert [link.context.span_id for link in queues[0].links] == [big.context.span_id]
        assert (queues[0].attributes or {})[tracing.BATCH_SIZE] == 3


def test_a_batch_follows_its_first_sampled_request(spans: InMemorySpanExporter) -> None:
    # With a ratio sampler a batch mixes sampled and unsampled requests: its span is kept
    # (parent: the sampled one), and only the sampled request gets a queue span.
    unsampled = trace.SpanContext(1, 0x11, is_remote=False, trace_flags=trace.TraceFlags(0))
    sampled = trace.SpanContext(2, 0x22, is_remote=False, trace_flags=trace.TraceFlags(1))
    span = tracing.start_batch([(unsampled, 0), (sampled, 0)], "digits", 2, rows=2, inline=True)
    tracing.end_batch(span)
    finished = spans.get_finished_spans()
    batch, queue = one(finished, tracing.BATCH), one(finished, tracing.QUEUE)
    assert batch.parent is not None and batch.parent.span_id == 0x22
    assert [link.context.span_id for link in batch.links] == [0x11, 0x22]
    assert queue.parent is not None and queue.parent.span_id == 0x22


async def test_a_model_error_marks_the_spans(spans: InMemorySpanExporter, repo: Path) -> None:
    factory = RuntimeFactory({("digits", 2): failing(RuntimeError("boom"))})
    async with serve(repo, factory) as stack, client_for(stack.dataplane, stack) as client:
        response = await client.post(
            "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"traceparent": TRACEPARENT}
        )
        bad_input = await client.post("/v1/models/digits:predict", json={"instances": [[1.0]]})
    assert response.status_code == 500 and bad_input.status_code == 400
    finished = spans.get_finished_spans()
    failed, refused = named(finished, "POST /v1/models/{model}:predict")
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert (failed.attributes or {})[tracing.CODE] == "INTERNAL"
    assert one(finished, tracing.BATCH).status.status_code == trace.StatusCode.ERROR
    # A client's bad input is not the server's failure: coded, status left unset.
    assert refused.status.status_code == trace.StatusCode.UNSET
    assert (refused.attributes or {})[tracing.CODE] == "INVALID_ARGUMENT"
    assert (refused.attributes or {})["http.response.status_code"] == 400
    decodes = named(finished, tracing.DECODE)
    assert len(decodes) == 2 and decodes[1].end_time is not None
    assert (decodes[1].attributes or {})[tracing.CODE] == "INVALID_ARGUMENT"


class ListSink:
    """A prediction log that keeps the segments it is given."""

    def __init__(self) -> None:
        self.segments: list[bytes] = []

    def append(self, segment: bytes, *, rows: int) -> None:
        self.segments.append(segment)


async def test_the_log_write_links_the_requests_it_logs(spans: InMemorySpanExporter, repo: Path) -> None:
    sink = ListSink()
    # The flush below cuts the interval short: all three go in one segment.
    logger = PredictionLogger(sink, flush_interval_s=5.0)
    logger.start()
    try:
        async with serve(repo) as stack:
            # A second data plane over the started registry, with the prediction logger.
            dataplane = DataPlane(stack.dataplane.registry, stack.dataplane.metrics, observer=logger)
            async with client_for(dataplane, stack) as client:
                for i in range(3):
                    headers = {"traceparent": f"00-{i + 1:032x}-{PARENT_ID}-01"}
                    response = await client.post(
                        "/v1/models/digits:predict", json={"instances": [ROW]}, headers=headers
                    )
                    assert response.status_code == 200
            assert await asyncio.to_thread(logger.flush, 5)
    finally:
        logger.stop()
    assert sum(batch.num_rows for segment in sink.segments for batch in decode_segment(segment)) == 3
    finished = spans.get_finished_spans()
    requests = named(finished, "POST /v1/models/{model}:predict")
    (write,) = named(finished, "modelloop.monitoring.write")
    request_ids = [r.context.span_id for r in requests if r.context is not None]
    assert [link.context.span_id for link in write.links] == request_ids
    assert write.parent is not None and write.parent.span_id == request_ids[0]
    assert hex_trace(write) == f"{1:032x}"
    attributes = write.attributes or {}
    assert attributes["modelloop.monitoring.requests"] == 3
    assert attributes[tracing.MODEL] == "digits" and attributes[tracing.VERSION] == 2


async def test_tracing_off_makes_no_spans(stack: EdgeStack) -> None:
    EXPORTER.clear()
    assert tracing.TRACER is None
    async with client_for(stack.dataplane, stack) as client:
        response = await client.post(
            "/v1/models/digits:predict", json={"instances": [ROW]}, headers={"traceparent": TRACEPARENT}
        )
    assert response.status_code == 200
    assert EXPORTER.get_finished_spans() == ()
    assert trace.get_current_span() is trace.INVALID_SPAN


# -- reading OTEL_* --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "exporters", "warnings"),
    [
        ({}, [], []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, [], []),
        ({"OTEL_TRACES_EXPORTER": "none"}, [], []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, [], []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"], []),
        ({"OTEL_TRACES_EXPORTER": " OTLP , console"}, ["otlp", "console"], []),
        ({"OTEL_TRACES_EXPORTER": "jaeger,console"}, ["console"], ["unknown exporter 'jaeger'"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"},
            ["console"],
            ["OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318' is malformed"],
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:99999/v1/traces",
            },
            [],
            ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT='http://c:99999/v1/traces' is malformed"],
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            [],
            ["OTEL_EXPORTER_OTLP_PROTOCOL='grpc' is not supported"],
        ),
    ],
)
def test_plan_reads_the_standard_variables(
    env: dict[str, str], exporters: list[str], warnings: list[str]
) -> None:
    plan = plan_tracing(env)
    assert plan.exporters == exporters
    assert len(plan.warnings) == len(warnings)
    for line, expected in zip(plan.warnings, warnings, strict=True):
        assert expected in line


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:4318", None),
        ("https://collector.example:443/otlp", None),
        ("localhost:4318", "not an http:// or https:// URL"),
        ("http://", "names no host"),
        ("http://host:port", "not a valid URL"),
    ],
)
def test_endpoint_problems(url: str, problem: str | None) -> None:
    found = endpoint_problem(url)
    assert found == problem if problem is None else (found is not None and problem in found)
