"""A real server process per module, with an admin token, over a copy of the digits repository."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.serverproc import ServerProcess, start_server

ADMIN_TOKEN = "reliability-token-0123456789"


@pytest.fixture(scope="module")
def hostile_repo(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> Path:
    repo = tmp_path_factory.mktemp("hostile") / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    return repo


@pytest.fixture(scope="module")
def server(hostile_repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(hostile_repo, env={"MODELLOOP_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        yield proc
    finally:
        proc.stop()
