"""``kill -9`` in the middle of an export leaves no half-written version to serve."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelloop.export.publish import list_versions
from modelloop.serving.repository import ModelRepository


def test_export_killed_midway_publishes_nothing(digits_run: Path, digits_repo: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelloop", "export", str(digits_run), "--repo", str(repo)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        deadline = time.monotonic() + 120
        staging = repo / ".staging"
        # Wait until the export is writing its SavedModel, then kill it without warning.
        while time.monotonic() < deadline and not any(staging.glob("*/saved_model")):
            assert proc.poll() is None, "export finished before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert list_versions(repo / "digits") == [1]  # nothing new became visible
    assert any(staging.iterdir())  # the debris stays hidden in the staging area
    assert ModelRepository(repo).versions("digits") == {1: repo / "digits" / "1"}
    # The next export is unaffected by the debris and publishes version 2.
    from modelloop.export.exporter import export_run

    assert export_run(digits_run, repo).version == 2
