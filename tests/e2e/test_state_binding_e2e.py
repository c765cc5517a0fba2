"""State that outlives its repository, against real servers.

The sequence found from outside, replayed with one state directory kept across runs (as
``./.modelloop`` used to be):

1. a server on repository A rolls version 2 out and an operator rolls it back: the store
   holds version 2 as RETIRED;
2. a server on a fresh repository B with the same state refuses to start, with one line
   naming both repositories and the ways out;
3. the same store from before repositories were recorded (no identity row) adopts B; when
   B gains its own version 2, the server keeps it out and says why in the model's status,
   the repository index and its log;
4. ``modelloop rollout clear digits`` forgets the state, and version 2 loads.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serverproc import ServerProcess, start_server, wait_for

TOKEN = "state-binding-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
POLICY = {"rollout": {"mode": "canary", "steps": [10, 100], "step_min_requests": 1000}}


def make_repo(root: Path, digits_repo: Path) -> Path:
    """A repository of its own (no id yet) holding only ``digits/1``, with a canary policy."""
    repo = root
    (repo / "digits").mkdir(parents=True)
    shutil.copytree(digits_repo / "digits" / "1", repo / "digits" / "1")
    (repo / "digits" / "config.json").write_text(json.dumps(POLICY))
    return repo


def publish_copy(repo: Path, version: int) -> None:
    """Publishes ``digits/<version>`` as a copy of version 1: built aside, renamed in."""
    staging = repo / ".staging" / f"digits-{version}"
    shutil.copytree(repo / "digits" / "1", staging)
    os.rename(staging, repo / "digits" / str(version))


def versions(server: ServerProcess) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{server.rest_url}/v1/models/digits", timeout=10).json()
    return {entry["version"]: entry for entry in body.get("model_version_status", [])}


def state_of(server: ServerProcess, version: str) -> str:
    return str(versions(server).get(version, {}).get("state", ""))


def rollout(server: ServerProcess) -> dict[str, Any]:
    r = httpx.get(f"{server.rest_url}/monitoring/rollouts/digits", timeout=10)
    return dict(r.json()) if r.status_code == 200 else {}


def serve_argv(repo: Path, state: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modelloop",
        "serve",
        "--repo",
        str(repo),
        "--state-dir",
        str(state),
        "--rest-port",
        "0",
        "--grpc-port",
        "0",
    ]


ENV = {
    "MODELLOOP_ADMIN_TOKEN": TOKEN,
    "MODELLOOP_MONITORING_ROLLOUT_INTERVAL_S": "0.2",
    "MODELLOOP_MONITORING_TRIGGER": "none",
}


@pytest.mark.timeout(600)
def test_state_left_by_another_repository_is_refused_shown_and_cleared(
    tmp_path: Path, digits_repo: Path
) -> None:
    state = tmp_path / "state"
    repo_a = make_repo(tmp_path / "a", digits_repo)
    repo_b = make_repo(tmp_path / "b", digits_repo)

    # 1. Repository A: version 2 rolls out, and an operator rolls it back.
    server = start_server(repo_a, "--state-dir", str(state), env=ENV)
    try:
        publish_copy(repo_a, 2)
        assert wait_for(lambda: rollout(server).get("candidate") == 2, timeout=60), server.output()
        r = httpx.post(f"{server.rest_url}/monitoring/rollouts/digits/rollback", headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["retired"].keys() == {"2"}, r.text
        # The rolled-back version unloads, and its status says why.
        assert wait_for(
            lambda: versions(server)["2"]["status"]["error_message"].startswith(
                "version 2 is kept out: RETIRED by rollout digits-2-"
            ),
            timeout=30,
        ), versions(server)
        # Without the admin token, nothing is cleared.
        r = httpx.post(f"{server.rest_url}/monitoring/rollouts/digits/clear", timeout=10)
        assert r.status_code == 401 and rollout(server)["retired"].keys() == {"2"}
    finally:
        server.stop()

    # 2. Repository B with the same state: a clear one-line refusal, before any port is bound.
    refused = subprocess.run(
        serve_argv(repo_b, state),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **ENV},
        check=False,
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("modelloop: error:")]
    assert len(errors) == 1, refused.stderr
    for part in (str(repo_a.resolve()), str(repo_b.resolve()), "--state-dir", "--store"):
        assert part in errors[0]
    assert "listening" not in refused.stdout

    # 3. The same store from before repositories were recorded: it adopts B ...
    with sqlite3.connect(state / "modelloop.db") as db:
        db.execute("DELETE FROM repository")
    server = start_server(repo_b, "--state-dir", str(state), env=ENV)
    try:
        assert "held rollout state from before it recorded its repository" in server.output()
        # ... and B's own version 2 is kept out by A's rollback, visibly.
        publish_copy(repo_b, 2)
        assert wait_for(lambda: "2" in versions(server), timeout=30), server.output()
        entry = versions(server)["2"]
        message = entry["status"]["error_message"]
        assert entry["state"] == "END" and message.startswith(
            "version 2 is kept out: RETIRED by rollout digits-2-"
        )
        assert "rolled back by an operator" in message and " UTC" in message
        assert message.endswith("clear with `modelloop rollout clear digits`")
        index = httpx.post(f"{server.rest_url}/v2/repository/index", headers=AUTH, json={}, timeout=10).json()
        assert {"name": "digits", "version": "2", "state": "END", "reason": message} in index
        assert wait_for(lambda: message in server.output(), timeout=10)  # logged too
        assert state_of(server, "1") == "AVAILABLE"

        # 4. The operator clears the state; version 2 loads (and rolls out afresh).
        cleared = subprocess.run(
            [sys.executable, "-m", "modelloop", "rollout", "clear", "digits", "--url", server.rest_url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MODELLOOP_ADMIN_TOKEN": TOKEN},
            check=False,
        )
        assert cleared.returncode == 0, cleared.stderr
        assert "rollout state cleared" in cleared.stdout and "RETIRED versions released: 2" in cleared.stdout
        assert wait_for(lambda: state_of(server, "2") == "AVAILABLE", timeout=60), server.output()
        assert versions(server)["2"]["status"]["error_message"] == ""
        assert wait_for(lambda: rollout(server).get("candidate") == 2, timeout=30)
        assert rollout(server)["retired"] == {}
    finally:
        server.stop()
