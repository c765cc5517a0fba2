"""Load: a soak over REST and gRPC together with 0 errors and bounded memory, and a queue
pushed past capacity that rejects cleanly (429 / RESOURCE_EXHAUSTED) and then recovers.

The soak lasts ``MODELLOOP_SOAK_SECONDS`` (default 30; ``make bench --soak`` holds 60 s and
reports the RSS growth). Its request rate is printed, never asserted (speeds are ``make
bench``'s business): what is checked is that nothing failed, that every tenth answer of each
client holds the model's prediction, and a generous leak bound.
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

SOAK_SECONDS = float(os.environ.get("MODELLOOP_SOAK_SECONDS", "30"))
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


def _expected(server) -> np.ndarray:
    """ONNX Runtime's probabilities for ``ROW`` on the served file: what every answer must hold."""
    import onnxruntime as ort

    repo = Path(server.proc.args[server.proc.args.index("--repo") + 1])
    session = ort.InferenceSession(
        str(repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["probabilities"], {"pixels": ROW})[0]


class Mixed:
    """REST and gRPC client threads that predict until a deadline and tally outcomes.

    Every ``CHECK_EVERY``-th answer of each thread is decoded and compared with ``expected``;
    a wrong one is an error like any other.
    """

    CHECK_EVERY = 10

    def __init__(self, server, rest_threads: int, grpc_threads: int, expected: np.ndarray) -> None:
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.server = server
        self.expected = expected
        self.codes: Counter[str] = Counter()
        self.checked = 0
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

    def _compare(self, got: np.ndarray, protocol: str) -> None:
        with self._lock:
            self.checked += 1
            if got.shape != self.expected.shape or not np.allclose(got, self.expected, atol=1e-5):
                self.errors.append(f"{protocol}: wrong prediction {got.tolist()}")

    def _rest(self) -> None:
        with httpx.Client(timeout=10) as client:
            sent = 0
            while time.monotonic() < self._deadline:
                try:
                    r = client.post(
                        f"{self.server.rest_url}/v1/models/digits:predict",
                        content=self._body,
                        headers={"content-type": "application/json"},
                    )
                    self._tally(f"http {r.status_code}", None if r.status_code == 200 else r.text)
                    if r.status_code == 200 and sent % self.CHECK_EVERY == 0:
                        self._compare(np.array(r.json()["predictions"], dtype=np.float32), "REST")
                except httpx.HTTPError as exc:
                    self._tally("http error", repr(exc))
                sent += 1

    def _grpc(self) -> None:
        from tensorflow.python.framework.tensor_util import MakeNdarray

        with grpc.insecure_channel(self.server.grpc_target) as channel:
            stub = self._stub_class(channel)
            sent = 0
            while time.monotonic() < self._deadline:
                try:
                    reply = stub.Predict(self._request, timeout=10)
                    self._tally("grpc OK")
                    if sent % self.CHECK_EVERY == 0:
                        self._compare(MakeNdarray(reply.outputs["probabilities"]), "gRPC")
                except grpc.RpcError as exc:
                    self._tally(f"grpc {exc.code().name}", exc.details())
                sent += 1

    def run(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds
        for t in self._threads:
            t.start()
        for t in self._threads:
            t.join(timeout=seconds + 30)


@pytest.mark.slow
def test_soak_rest_and_grpc_at_32_connections(server):
    expected = _expected(server)
    warm = Mixed(server, 4, 4, expected)
    warm.run(3)
    rss_start = _rss_kib(server.pid)
    load = Mixed(server, 16, 16, expected)
    started = time.monotonic()
    load.run(SOAK_SECONDS)
    elapsed = time.monotonic() - started
    rss_end = _rss_kib(server.pid)
    total = sum(load.codes.values())
    print(
        f"\nsoak {elapsed:.0f} s, 16 REST + 16 gRPC connections: {total} requests ({total / elapsed:.0f}/s), "
        f"{dict(load.codes)}, {load.checked} bodies checked; server RSS {rss_start / 1024:.0f} MiB -> "
        f"{rss_end / 1024:.0f} MiB ({(rss_end / rss_start - 1) * 100:+.1f} %)"
    )
    assert load.errors == []
    assert set(load.codes) == {"http 200", "grpc OK"}
    # Each of the 32 clients had its first answer checked, and more after it.
    assert load.checked >= 32 and load.checked * Mixed.CHECK_EVERY >= total - 32 * Mixed.CHECK_EVERY
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
    from tensorflow.python.framework.tensor_util import MakeNdarray

    expected = _expected(tight_server)
    codes: Counter[str] = Counter()
    messages: set[str] = set()
    answers: list[np.ndarray] = []
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
                    elif r.status_code == 200:
                        answers.append(np.array(r.json()["predictions"], dtype=np.float32))

    def grpc_flood(_: int) -> None:
        with grpc.insecure_channel(tight_server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(40):
                try:
                    reply = stub.Predict(request, timeout=10)
                    code = "grpc OK"
                    answer = MakeNdarray(reply.outputs["probabilities"])
                except grpc.RpcError as exc:
                    code = f"grpc {exc.code().name}"
                    answer = None
                    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        messages.add(exc.details() or "")
                with lock:
                    codes[code] += 1
                    if answer is not None:
                        answers.append(answer)

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
    assert messages and all("queue" in m for m in messages)
    # Whatever was served during the flood was the model's prediction.
    assert len(answers) == codes["http 200"] + codes["grpc OK"]
    for answer in answers:
        np.testing.assert_allclose(answer, expected, atol=1e-5)
    # Recovery: once the flood is over, every request is served.
    for _ in range(20):
        r = httpx.post(
            f"{tight_server.rest_url}/v1/models/digits:predict",
            content=body,
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert r.status_code == 200
        np.testing.assert_allclose(np.array(r.json()["predictions"]), expected, atol=1e-5)
    metrics = httpx.get(f"{tight_server.rest_url}/metrics", timeout=5).text
    assert 'code="RESOURCE_EXHAUSTED"' in metrics
