"""A real ``modelloop serve`` exporting its spans over OTLP/HTTP to a receiver this test runs.

The receiver is a small HTTP server in the test process that takes ``POST /v1/traces``
and decodes the ``ExportTraceServiceRequest`` protobuf (opentelemetry-proto). The server
is configured only through the standard variables (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``). REST and gRPC calls, in both
dialects, carry a W3C ``traceparent``; the spans that arrive must continue those traces.
A second server with bad ``OTEL_*`` settings must warn and serve untraced.
"""

from __future__ import annotations

import gzip
import http.server
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from modelloop.serving.protos.tfserving import tensorflow_serving_apis_predict_pb2 as predict_pb2
from modelloop.serving.protos.tfserving import (
    tensorflow_serving_apis_prediction_service_pb2_grpc as prediction_service_pb2_grpc,
)

from .serverproc import ServerProcess, start_server, wait_for

PARENT_ID = "00f067aa0ba902b7"
ROW = [float(i % 17) for i in range(64)]
CHILDREN = {"modelloop.decode", "modelloop.queue", "modelloop.batch", "modelloop.encode"}
CALLS = {
    "tfserving_rest": ("POST /v1/models/{model}:predict", f"{1:032x}"),
    "v2_rest": ("POST /v2/models/{model}/infer", f"{2:032x}"),
    "tfserving_grpc": ("tensorflow.serving.PredictionService/Predict", f"{3:032x}"),
    "v2_grpc": ("inference.GRPCInferenceService/ModelInfer", f"{4:032x}"),
}


@dataclass
class ReceivedSpan:
    """One span as the receiver decoded it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]
    links: list[tuple[str, str]]
    service: str
    worker: object


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver on a free loopback port."""

    port: int = 0
    spans: list[ReceivedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def traces(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


def _value(any_value: object) -> object:
    kind = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(any_value, kind) if kind else None


def _decode(body: bytes) -> list[ReceivedSpan]:
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    found = []
    for resource_spans in message.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        service=str(resource.get("service.name")),
                        worker=resource.get("modelloop.worker"),
                    )
                )
    return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            spans = _decode(body)
            with state.lock:
                state.spans.extend(spans)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _serve(repo: Path, state: Path, env: dict[str, str], *extra: str) -> ServerProcess:
    return start_server(
        repo,
        "--state-dir",
        str(state),
        *extra,
        env={"MODELLOOP_MONITORING_TRIGGER": "none", "OTEL_SDK_DISABLED": "false", **env},
    )


def _otlp_env(receiver: Receiver) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_SERVICE_NAME": "modelloop-e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="module")
def traced(
    served_repo: Path, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = _serve(served_repo, tmp_path_factory.mktemp("traced-state"), _otlp_env(receiver))
    try:
        yield proc
    finally:
        proc.stop()


def _traceparent(protocol: str) -> str:
    return f"00-{CALLS[protocol][1]}-{PARENT_ID}-01"


def test_rest_and_grpc_calls_continue_the_callers_traces(traced: ServerProcess, receiver: Receiver) -> None:
    rest = traced.rest_url
    answer = httpx.post(
        f"{rest}/v1/models/digits:predict",
        json={"instances": [ROW]},
        headers={"traceparent": _traceparent("tfserving_rest")},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    answer = httpx.post(
        f"{rest}/v2/models/digits/infer",
        json={"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]},
        headers={"traceparent": _traceparent("v2_rest")},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    with grpc.insecure_channel(traced.grpc_target) as channel:
        predict = predict_pb2.PredictRequest()
        predict.model_spec.name = "digits"
        tensor = predict.inputs["pixels"]
        tensor.dtype = 1  # DT_FLOAT
        tensor.tensor_shape.dim.add(size=1)
        tensor.tensor_shape.dim.add(size=64)
        tensor.float_val.extend(ROW)
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict, metadata=(("traceparent", _traceparent("tfserving_grpc")),), timeout=10
        )
        infer = oip.ModelInferRequest(model_name="digits")
        infer.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
        infer.raw_input_contents.append(np.array([ROW], "<f4").tobytes())
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer, metadata=(("traceparent", _traceparent("v2_grpc")),), timeout=10
        )

    def complete(protocol: str) -> bool:
        names = {s.name for s in receiver.traces(CALLS[protocol][1])}
        return {CALLS[protocol][0], *CHILDREN} <= names

    assert wait_for(lambda: all(complete(p) for p in CALLS), timeout=20), (
        [(s.name, s.trace_id) for s in receiver.spans],
        traced.output(),
    )
    for protocol, (name, trace_id) in CALLS.items():
        spans = receiver.traces(trace_id)
        (request,) = [s for s in spans if s.name == name]
        assert request.parent_id == PARENT_ID, protocol
        assert request.service == "modelloop-e2e"
        assert request.attributes["modelloop.model"] == "digits"
        assert request.attributes["modelloop.version"] == 1
        assert request.attributes["modelloop.protocol"] == protocol
        for child in (s for s in spans if s.name in CHILDREN):
            assert child.parent_id == request.span_id, (protocol, child.name)
        (batch,) = [s for s in spans if s.name == "modelloop.batch"]
        assert (trace_id, request.span_id) in batch.links
        assert batch.attributes["modelloop.batch.size"] == 1
    # The monitoring writer's spans link to the requests they logged.
    requests = {(s.trace_id, s.span_id) for p in CALLS for s in receiver.named(CALLS[p][0])}
    assert wait_for(
        lambda: (
            requests
            <= {link for write in receiver.named("modelloop.monitoring.write") for link in write.links}
        ),
        timeout=20,
    ), [s.links for s in receiver.named("modelloop.monitoring.write")]


def test_bad_otel_settings_warn_and_the_server_serves_untraced(
    served_repo: Path, tmp_path: Path, receiver: Receiver
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(served_repo, repo)
    env = {"OTEL_TRACES_EXPORTER": "zipkin-ish,otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"}
    proc = _serve(repo, tmp_path / "state", env)
    try:
        answer = httpx.post(
            f"{proc.rest_url}/v1/models/digits:predict",
            json={"instances": [ROW]},
            headers={"traceparent": f"00-{9:032x}-{PARENT_ID}-01"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"][0]) == 10
        output = proc.output()
        assert "unknown exporter 'zipkin-ish'" in output, output
        assert "OTEL_EXPORTER_OTLP_ENDPOINT='127.0.0.1:4318' is malformed" in output, output
        assert "tracing is off" in output, output
    finally:
        assert proc.stop() == 0
    assert receiver.traces(f"{9:032x}") == []


def test_each_worker_exports_its_own_spans(served_repo: Path, tmp_path: Path, receiver: Receiver) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(served_repo, repo)
    proc = _serve(repo, tmp_path / "state", _otlp_env(receiver), "--workers", "2")
    trace_ids = [f"{0xA000 + i:032x}" for i in range(24)]
    try:
        for trace_id in trace_ids:
            # A connection per request: the kernel spreads them over both workers' sockets.
            answer = httpx.post(
                f"{proc.rest_url}/v1/models/digits:predict",
                json={"instances": [ROW]},
                headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text

        def workers() -> set[object]:
            return {
                s.worker
                for t in trace_ids
                for s in receiver.traces(t)
                if s.name == "POST /v1/models/{model}:predict"
            }

        assert wait_for(lambda: workers() == {0, 1}, timeout=20), (workers(), proc.output())
    finally:
        assert proc.stop() == 0


def test_an_unreachable_collector_costs_spans_not_requests(served_repo: Path, tmp_path: Path) -> None:
    # A port bound for the whole test and never listened on: nobody else can take it, and
    # every connection to it is refused.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    repo = tmp_path / "repo"
    shutil.copytree(served_repo, repo)
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    try:
        proc = _serve(repo, tmp_path / "state", env)
    except BaseException:
        probe.close()
        raise
    try:
        with httpx.Client(base_url=proc.rest_url, timeout=10) as client:
            for _ in range(20):
                answer = client.post("/v1/models/digits:predict", json={"instances": [ROW]})
                assert answer.status_code == 200, answer.text
        assert "tracing on" in proc.output()
    finally:
        started = time.monotonic()
        # The last spans wait at most 3 s for a collector that is not there: the server exits
        # by itself (0), well within stop()'s 30 s before a SIGKILL. The time is printed.
        try:
            assert proc.stop() == 0, proc.output()
        finally:
            probe.close()
    print(f"\nstopped in {time.monotonic() - started:.1f} s with the collector gone")
