"""tritonclient 2.73 (http) against the REST app: JSON and binary tensors, errors, repository.

tritonclient needs protobuf < 7 and so lives in its own environment (``.venv-clients``,
made by ``make install``); it runs in a subprocess against a real uvicorn server.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from modelloop.serving.rest.app import create_app
from modelloop.serving.settings import ServingSettings

from .fakes_rest import FakeDataPlane

ROOT = Path(__file__).resolve().parents[3]
CLIENT_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
SCRIPT = Path(__file__).with_name("tritonclient_check.py")


@pytest.fixture
def server_port(tmp_path: Path) -> Iterator[int]:
    settings = ServingSettings(repo=tmp_path, admin_token="tok")
    app = create_app(FakeDataPlane(), settings, CollectorRegistry())  # type: ignore[arg-type]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(not CLIENT_PYTHON.exists(), reason="needs .venv-clients (make install)")
def test_tritonclient_http(server_port: int) -> None:
    done = subprocess.run(
        [str(CLIENT_PYTHON), str(SCRIPT), str(server_port)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ALL OK" in done.stdout, done.stdout
