"""tritonclient 2.73 (http) against the REST app: JSON and binary tensors, errors, repository.

The app serves the real DataPlane with fake runtimes (``tests/serving/edge_support.py``)
on uvicorn, in this test's event loop. tritonclient needs protobuf < 7 and so lives in
its own environment (``.venv-clients``, made by ``make install``); it runs in a subprocess.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelloop.serving.rest.app import create_app
from modelloop.serving.rest.server import bind_rest_socket, create_rest_server

from ..edge_support import EdgeStack, run_client_script, serve, write_digits, write_multi

SCRIPT = Path(__file__).with_name("tritonclient_check.py")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[int, EdgeStack]]:
    repo = tmp_path / "models"
    write_digits(repo, (1, 2))
    write_multi(repo)
    async with serve(repo, admin_token="tok") as stack:
        sock = bind_rest_socket("127.0.0.1", 0)
        rest = create_rest_server(
            create_app(stack.dataplane, stack.settings, stack.prometheus), stack.settings
        )
        task = asyncio.create_task(rest.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(10):
                while not rest.started:
                    assert not task.done(), "uvicorn did not start"
                    await asyncio.sleep(0.01)
            yield sock.getsockname()[1], stack
        finally:
            rest.should_exit = True
            await task
            sock.close()


async def test_tritonclient_http(served: tuple[int, EdgeStack]) -> None:
    port, stack = served
    await run_client_script(str(SCRIPT), str(port))
    # What the client sent reached the real data plane: both versions answered over v2_rest.
    assert stack.count("digits", "1", "v2_rest", "OK") == 2
    assert stack.count("digits", "2", "v2_rest", "OK") >= 4
    assert stack.count("", "", "v2_rest", "NOT_FOUND") == 1
