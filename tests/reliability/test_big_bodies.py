"""64 MiB bodies do not stall the server: refused before decoding, probes answered meanwhile.

The issue's body: a 64 MiB ``:predict`` (the default limit) of about 516,000 rows of
``digits``. Decoded whole, it held the event loop 4.5 s, and ``/v2/health/live`` and gRPC
``ServerLive`` waited as long (the Kubernetes liveness probe gives up at 3 s). Three such
bodies arrive together here while a prober times both probes; each must answer within 1 s.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from tests.e2e.serverproc import ServerProcess, start_server

MIB = 1024 * 1024
LIVENESS_BOUND_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("big") / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    proc = start_server(repo, "--no-monitoring")
    try:
        yield proc
    finally:
        proc.stop()


def big_body(limit: int = 64 * MIB) -> tuple[bytes, int]:
    """``{"instances": [[0, ..., 0], ...]}`` with as many 64-value rows as fit in ``limit``."""
    row = b"[" + b",".join([b"0"] * 64) + b"]"
    rows = (limit - 64) // (len(row) + 1)
    return b'{"instances":[' + b",".join([row] * rows) + b"]}", rows


class Prober(threading.Thread):
    """Times ``/v2/health/live`` and gRPC ``ServerLive`` every 50 ms until stopped."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.rest: list[float] = []
        self.grpc: list[float] = []

    def run(self) -> None:
        with (
            httpx.Client(timeout=30) as client,
            grpc.insecure_channel(self.server.grpc_target) as channel,
        ):
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            while not self.stop.is_set():
                start = time.perf_counter()
                assert client.get(f"{self.server.rest_url}/v2/health/live").status_code == 200
                self.rest.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert stub.ServerLive(oip.ServerLiveRequest(), timeout=30).live
                self.grpc.append(time.perf_counter() - start)
                time.sleep(0.05)


def test_liveness_answers_within_a_second_while_64_mib_bodies_arrive(server: ServerProcess) -> None:
    body, rows = big_body()
    url = f"{server.rest_url}/v1/models/digits:predict"
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(timeout=120) as client:
            answers.append(client.post(url, content=body, headers={"content-type": "application/json"}))

    prober = Prober(server)
    prober.start()
    time.sleep(0.5)
    start = time.perf_counter()
    senders = [threading.Thread(target=send) for _ in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=300)
    elapsed = time.perf_counter() - start
    time.sleep(0.5)
    prober.stop.set()
    prober.join(timeout=60)
    worst_rest, worst_grpc = max(prober.rest), max(prober.grpc)
    print(
        f"\n3 x {len(body) / MIB:.0f} MiB bodies of {rows:,} rows answered in {elapsed:.2f} s; "
        f"/v2/health/live worst {worst_rest * 1000:.0f} ms of {len(prober.rest)}, "
        f"gRPC ServerLive worst {worst_grpc * 1000:.0f} ms of {len(prober.grpc)}"
    )
    assert [a.status_code for a in answers] == [400, 400, 400], [a.text[:300] for a in answers]
    assert all("refused before decoding" in a.json()["error"] for a in answers)
    assert worst_rest < LIVENESS_BOUND_S and worst_grpc < LIVENESS_BOUND_S
    # The server is fine afterwards.
    ok = httpx.post(url, json={"instances": [[0.0] * 64]}, timeout=30)
    assert ok.status_code == 200
