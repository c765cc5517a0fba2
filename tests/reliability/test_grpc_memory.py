"""Refused gRPC requests release their messages at once, not at the next full collection.

Sixteen 60 MiB ModelInfer calls to a model the server does not have are refused
(NOT_FOUND). If anything on the error path keeps the refused call's frames alive in a
reference cycle (an exception whose traceback holds the frame that holds the exception
and the request), each 60 MiB message stays until Python's cyclic collector happens to
run a full collection: the issue saw 16 calls reach 2.3 GB. The server process's own RSS
(``/proc/<pid>/status``) must be back within 100 MiB of where it started 5 s later.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modelloop.serving.protos import grpc_service_pb2 as oip
from modelloop.serving.protos import grpc_service_pb2_grpc as oip_grpc
from tests.e2e.serverproc import ServerProcess, start_server

MIB = 1024 * 1024
CALLS = 16
MESSAGE_BYTES = 60 * MIB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("empty") / "repo"
    repo.mkdir()
    proc = start_server(repo, "--no-monitoring")
    try:
        yield proc
    finally:
        proc.stop()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _call(stub: oip_grpc.GRPCInferenceServiceStub, payload: bytes, model: str) -> grpc.StatusCode:
    request = oip.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="pixels", datatype="BYTES", shape=[1])
    del tensor
    request.raw_input_contents.append(payload)
    try:
        stub.ModelInfer(request, timeout=60)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_sixteen_refused_60_mib_calls_leave_no_memory_behind(server: ServerProcess) -> None:
    options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
    payload = b"\x07" * MESSAGE_BYTES
    with grpc.insecure_channel(server.grpc_target, options=options) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        # One small refused call first, so that the baseline includes grpc's own buffers.
        assert _call(stub, b"x", "no-such-model") == grpc.StatusCode.NOT_FOUND
        time.sleep(1)
        start = rss_mib(server.pid)
        peak = start
        for _ in range(CALLS):
            assert _call(stub, payload, "no-such-model") == grpc.StatusCode.NOT_FOUND
            peak = max(peak, rss_mib(server.pid))
        time.sleep(5)
        end = rss_mib(server.pid)
    print(
        f"\nserver RSS: {start:.0f} MiB at start, {peak:.0f} MiB peak, {end:.0f} MiB 5 s after {CALLS} calls"
    )
    assert end - start < 100, f"RSS {start:.0f} -> {end:.0f} MiB after {CALLS} refused 60 MiB calls"
