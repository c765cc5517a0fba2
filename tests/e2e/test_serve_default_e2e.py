"""``modelloop serve`` alone answers and logs; the analysis is the control plane's.

A server started with no ``--control-plane`` (and no ``MODELLOOP_CONTROL_PLANE_URL``) runs no
analysis: its ``/metrics`` has no drift or accuracy, its prediction log grows and nothing
reads it. A control plane started later on the same state reads the whole backlog.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import httpx
import numpy as np
from sklearn.datasets import load_digits

from tests.e2e.serverproc import MonitorProcess, ServerProcess, start_monitor, start_server, wait_for

REQUESTS = 30


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return int(conn.execute(sql).fetchone()[0] or 0)
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def test_serve_alone_logs_and_a_later_control_plane_reads_the_backlog(
    tmp_path: Path, digits_repo: Path
) -> None:
    repo, state = tmp_path / "repo", tmp_path / "state"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    env = {k: v for k, v in os.environ.items() if k != "MODELLOOP_CONTROL_PLANE_URL"}
    rows = load_digits().data[:REQUESTS].astype(np.float32)
    server: ServerProcess | None = None
    plane: MonitorProcess | None = None
    db = state / "modelloop.db"
    try:
        server = start_server(repo, "--state-dir", str(state), env=env, control_plane=None)
        for i, row in enumerate(rows):
            r = httpx.post(
                f"{server.rest_url}/v1/models/digits:predict",
                json={"instances": [row.tolist()]},
                headers={"x-request-id": f"alone-{i}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
        # Logged, and read by no one: the server runs no analysis of its own.
        assert wait_for(lambda: _count(db, "SELECT sum(rows) FROM prediction_log") == REQUESTS, 20)
        assert _count(db, "SELECT count(*) FROM predictions") == 0
        page = httpx.get(f"{server.rest_url}/metrics", timeout=10).text
        assert "modelloop_requests_total" in page and "modelloop_drift_" not in page
        # The control plane it names by default is this host's modelloop monitor.
        assert "http://127.0.0.1:8502" in server.output()
        # A control plane started later reads the log from its start.
        plane = start_monitor(repo, "--state-dir", str(state))
        ids = "SELECT count(*) FROM predictions WHERE request_id LIKE 'alone-%'"
        assert wait_for(lambda: _count(db, ids) == REQUESTS, 30), plane.output()
        # SIGTERM stops the control plane cleanly (its loop owns the signal, not uvicorn).
        assert plane.stop() == 0, plane.output()
    finally:
        if server is not None:
            server.stop()
        if plane is not None:
            plane.stop()
