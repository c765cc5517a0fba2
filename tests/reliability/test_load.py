"""Load: a soak over REST and gRPC together with 0 errors and bounded memory, and a queue
pushed past capacity that rejects cleanly (429 / RESOURCE_EXHAUSTED) and then recovers.

The soak lasts ``MODELLOOP_SOAK_SECONDS`` (default 60). Figures are printed, not asserted
as speeds: only errors and a generous leak bound are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from tests.e2e.serverproc import start_server

SOAK_SECONDS = float(os.environ.get("MODELLOOP_SOAK_SECONDS", "60"))
ROW = np.zeros((1, 64), dtype=np.float32)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _predict_request():
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in ROW.shape]
    )
    request.inputs["pixels"].CopyFrom(
        tensor_pb2.TensorProto(dtype=1, tensor_shape=shape, tensor_content=ROW.tobytes())
    )
    return request


class Mixed:
    """REST and gRPC client threads that predict until a deadline and tally outcomes."""

    def __init__(self, server, rest_threads: int, grpc_threads: int) -> None:
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.server = server
        self.codes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stub_class = prediction_service_pb2_grpc.PredictionServiceStub
        self._body = json.dumps({"instances": ROW.tolist()}).encode()
        self._request = _predict_request()
        self._threads = [threading.Thread(target=self._rest) for _ in range(rest_threads)]
        self._threads += [threading.Thread(target=self._grpc) for _ in range(grpc_threads)]
        self._deadline = 0.0

    def _tally(self, code: str, error: str | None = None) -> None:
        with self._lock:
            self.codes[code] += 1
            if error:
                self.errors.append(error)

    def _rest(self) -> None:
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < self._deadline:
                try:
                    r = client.post(
                        f"{self.server.rest_url}/v1/models/digits:predict",
                        content=self._body,
                        headers={"content-type": "application/json"},
                    )
                    self._tally(f"http {r.status_code}", None if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    self._tally("http error", repr(exc))

    def _grpc(self) -> None:
        with grpc.insecure_channel(self.server.grpc_target) as channel:
            stub = self._stub_class(channel)
            while time.monotonic() < self._deadline:
                try:
                    stub.Predict(self._request, timeout=10)
                    self._tally("grpc OK")
                except grpc.RpcError as exc:
                    self._tally(f"grpc {exc.code().name}", exc.details())

    def run(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds
        for t in self._threads:
            t.start()
        for t in self._threads:
            t.join(timeout=seconds + 30)


@pytest.mark.slow
def test_soak_rest_and_grpc_at_32_connections(server):
    warm = Mixed(server, 4, 4)
    warm.run(3)
    rss_start = _rss_kib(server.pid)
    load = Mixed(server, 16, 16)
    started = time.monotonic()
    load.run(SOAK_SECONDS)
    elapsed = time.monotonic() - started
    rss_end = _rss_kib(server.pid)
    total = sum(load.codes.values())
    print(
        f"\nsoak {elapsed:.0f} s, 16 REST + 16 gRPC connections: {total} requests ({total / elapsed:.0f}/s), "
        f"{dict(load.codes)}; server RSS {rss_start / 1024:.0f} MiB -> {rss_end / 1024:.0f} MiB "
        f"({(rss_end / rss_start - 1) * 100:+.1f} %)"
    )
    assert load.errors == []
    assert set(load.codes) == {"http 200", "grpc OK"}
    assert total > SOAK_SECONDS * 20
    assert rss_end < rss_start * 1.5, "memory grew by half during the soak"


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory, digits_repo):
    repo = tmp_path_factory.mktemp("tight") / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    config = {
        "batching": {
            "enabled": True,
            "max_batch_size": 1,
            "max_enqueued_batches": 1,
            "batch_timeout_micros": 0,
        }
    }
    (repo / "digits" / "config.json").write_text(json.dumps(config))
    proc = start_server(repo)
    try:
        yield proc
    finally:
        proc.stop()


def test_full_queue_rejects_cleanly_then_recovers(tight_server):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    body = json.dumps({"instances": ROW.tolist()}).encode()
    request = _predict_request()
    codes: Counter[str] = Counter()
    messages: set[str] = set()
    lock = threading.Lock()

    def rest_flood(_: int) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(40):
                r = client.post(
                    f"{tight_server.rest_url}/v1/models/digits:predict",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                with lock:
                    codes[f"http {r.status_code}"] += 1
                    if r.status_code == 429:
                        messages.add(r.json()["error"])

    def grpc_flood(_: int) -> None:
        with grpc.insecure_channel(tight_server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(40):
                try:
                    stub.Predict(request, timeout=10)
                    code = "grpc OK"
                except grpc.RpcError as exc:
                    code = f"grpc {exc.code().name}"
                with lock:
                    codes[code] += 1

    with ThreadPoolExecutor(max_workers=48) as pool:
        futures = [pool.submit(rest_flood, i) for i in range(24)] + [
            pool.submit(grpc_flood, i) for i in range(24)
        ]
        for f in futures:
            f.result()
    print(f"\nflood past capacity: {dict(codes)}")
    assert set(codes) <= {"http 200", "http 429", "grpc OK", "grpc RESOURCE_EXHAUSTED"}
    assert codes["http 429"] > 0 and codes["grpc RESOURCE_EXHAUSTED"] > 0
    assert codes["http 200"] > 0 and codes["grpc OK"] > 0
    assert all("queue" in m for m in messages)
    # Recovery: once the flood is over, every request is served.
    for _ in range(20):
        r = httpx.post(
            f"{tight_server.rest_url}/v1/models/digits:predict",
            content=body,
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert r.status_code == 200
    metrics = httpx.get(f"{tight_server.rest_url}/metrics", timeout=5).text
    assert 'code="RESOURCE_EXHAUSTED"' in metrics
