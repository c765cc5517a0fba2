"""The prediction log in object storage, end to end: ``modelloop monitor --log-url s3://...``
and two ``modelloop serve --control-plane URL --log-url s3://...`` against moto's S3 server.

- Every answered request reaches the control plane once; labels sent to one server join
  predictions the other answered (each server writes its segment objects before it forwards).
- ``modelloop log export --log-url`` writes them as Parquet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from tests.e2e.serverproc import MonitorProcess, ServerProcess, start_monitor, start_server, wait_for
from tests.s3server import S3Server

BUCKET = "predictions"
LOG_URL = f"s3://{BUCKET}/fleet"


@dataclass
class ObjectFleet:
    s3: S3Server
    repo: Path
    state: Path
    plane: MonitorProcess
    servers: list[ServerProcess]


@pytest.fixture(scope="module")
def fleet(served_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectFleet]:
    root = tmp_path_factory.mktemp("object-fleet")
    state = root / "state"
    with S3Server.start(root) as s3:
        s3.client().create_bucket(Bucket=BUCKET)
        env = s3.env(MODELLOOP_MONITORING_EVAL_INTERVAL_S="0.5")
        plane = start_monitor(served_repo, "--state-dir", str(state), "--log-url", LOG_URL, env=env)
        servers: list[ServerProcess] = []
        try:
            for _ in range(2):
                servers.append(
                    start_server(
                        served_repo,
                        "--state-dir",
                        str(state),
                        "--control-plane",
                        plane.url,
                        "--log-url",
                        LOG_URL,
                        env=env,
                    )
                )
            yield ObjectFleet(s3, served_repo, state, plane, servers)
        finally:
            for server in servers:
                server.stop()
            plane.stop()


def _predict(url: str, client: httpx.Client, rid: str, row: np.ndarray) -> None:
    r = client.post(
        f"{url}/v1/models/digits:predict",
        json={"instances": [row.tolist()]},
        headers={"x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_two_servers_log_objects_that_one_control_plane_reads_once(
    fleet: ObjectFleet, tmp_path: Path
) -> None:
    digits = load_digits()
    with httpx.Client(timeout=60) as client:
        for i in range(40):
            _predict(fleet.servers[i % 2].rest_url, client, f"obj{i}", digits.data[i].astype(np.float32))
        items = [{"request_id": f"obj{i}", "target": int(digits.target[i])} for i in range(40)]
        r = client.post(f"{fleet.servers[1].rest_url}/v1/models/digits/feedback", json={"feedback": items})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["accepted"]) == sorted(f"obj{i}" for i in range(40))
    keys = [o["Key"] for o in fleet.s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys and all(k.startswith("fleet/") and k.endswith(".arrows") for k in keys)
    # Both servers wrote objects of their own (host, pid and token in the name).
    assert len({k.rsplit("-", 1)[0].split("Z-", 1)[1] for k in keys}) == 2
    labels = {"model": "digits", "version": "1"}
    assert wait_for(
        lambda: fleet.plane.metric("modelloop_monitoring_window_rows", **labels) >= 40, timeout=60
    )
    assert fleet.plane.metric("modelloop_monitoring_window_rows", **labels) == 40

    out = tmp_path / "digits.parquet"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelloop",
            "log",
            "export",
            "--model",
            "digits",
            "--out",
            str(out),
            "--repo",
            str(fleet.repo),
            "--log-url",
            LOG_URL,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **fleet.s3.env()},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert sorted(table.column("request_id").to_pylist()) == sorted(f"obj{i}" for i in range(40))
    assert {len(d) for d in table.column("input_digest").to_pylist()} == {32}  # filled in by the reader
