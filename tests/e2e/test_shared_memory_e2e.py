"""tritonclient's system shared memory utilities against a real ``modelloop serve``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.serverproc import ServerProcess, start_server
from tests.tools import clients_python

TOKEN = "e2e-shm-admin-token"
ATOL = 1e-5


@pytest.fixture(scope="module")
def admin_server(served_repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(served_repo, env={"MODELLOOP_ADMIN_TOKEN": TOKEN})
    try:
        yield proc
    finally:
        proc.stop()


def test_tritonclient_registers_and_infers_through_system_shared_memory(
    admin_server: ServerProcess, served_repo: Path, digits_run: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    rows = np.load(digits_run / "split.npz")["x_test"][:8].astype(np.float32)
    session = ort.InferenceSession(
        str(served_repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = session.run(["probabilities"], {"pixels": rows})[0]
    rows_path = tmp_path / "rows.json"
    rows_path.write_text(json.dumps(rows.tolist()))
    proc = subprocess.run(
        [
            clients_python(),
            str(Path(__file__).parent / "tritonclient_shm_e2e.py"),
            admin_server.rest_url.removeprefix("http://"),
            admin_server.grpc_target,
            str(rows_path),
            TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "system_shared_memory" in result["extensions"]
    assert "Bearer" in result["http_register_without_token"]
    assert sorted(r["name"] for r in result["http_status"]) == ["in", "out"]
    assert result["grpc_status"] == ["in", "out"]
    for key in ("http", "http_async", "grpc", "grpc_async", "http_aio", "grpc_aio"):
        np.testing.assert_allclose(np.array(result[key]), expected, atol=ATOL, err_msg=key)
    assert result["http_output_parameters"]["shared_memory_region"] == "out"
    mismatch = "shared_memory_byte_size is 2044 but a FP32 tensor of shape [8, 64] has 2048 bytes"
    assert mismatch in result["http_size_mismatch"]
    assert result["http_status_after"] == []
    assert "region 'in' is not registered" in result["grpc_unregistered"]
    for key in ("http_cuda", "grpc_cuda"):
        assert "CUDA shared memory is not available" in result[key], key
