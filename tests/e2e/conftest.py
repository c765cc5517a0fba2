"""A real server process per module, over a private copy of the digits repository."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.serverproc import ServerProcess, start_server


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> Path:
    repo = tmp_path_factory.mktemp("served") / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    return repo


@pytest.fixture(scope="module")
def server(served_repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(served_repo)
    try:
        yield proc
    finally:
        proc.stop()
