"""Monitoring fixtures: a private PostgreSQL cluster, digits baselines, a fake model catalog.

The cluster runs Debian's ``initdb``/``pg_ctl`` on 127.0.0.1 and a free port (another one
when that port was taken before the server bound it), as the
``postgres`` user when the tests run as root (PostgreSQL refuses root). It is stopped by
``pg_ctl`` and, failing that, by its postmaster PID, even when tests fail.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.monitoring.monhelpers import DigitsData
from tests.tools import PortTaken, launch_on_free_port, port_taken, postgres_bindir


@dataclass
class PostgresCluster:
    """A running private cluster."""

    bindir: Path
    data: Path
    port: int
    user: str | None
    pid: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else list(cmd)

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args),
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def read_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for the session (Debian's; a missing one fails under CI, else skips)."""
    bindir = postgres_bindir()
    user = "postgres" if os.geteuid() == 0 else None
    # Not under pytest's tmp dir: its parents are 0700 root, which the postgres user
    # could not traverse.
    root = Path(tempfile.mkdtemp(prefix="modelloop-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if user:
        entry = pwd.getpwnam(user)
        for path in (root, sock):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    cluster = PostgresCluster(bindir, data, 0, user, pid=0)
    try:
        subprocess.run(
            cluster._as_owner(
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        log = root / "server.log"

        def start(port: int) -> None:
            options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sock} -c fsync=on"
            cluster.port = port
            try:
                cluster.pg_ctl("-l", str(log), "-o", options, "-w", "-t", "60", "start")
            except subprocess.CalledProcessError:
                if log.exists() and port_taken(log.read_text(errors="replace")):
                    log.unlink()
                    raise PortTaken(f"port {port}") from None
                raise

        launch_on_free_port(start)
        cluster.pid = cluster.read_pid()
        yield cluster
    finally:
        _stop_cluster(cluster)
        shutil.rmtree(root, ignore_errors=True)


def _stop_cluster(cluster: PostgresCluster) -> None:
    if (cluster.data / "postmaster.pid").exists():
        with contextlib.suppress(Exception):
            cluster.pid = cluster.read_pid()
        with contextlib.suppress(Exception):
            cluster.pg_ctl("-m", "immediate", "-w", "-t", "20", "stop", timeout=30)
    if cluster.pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cluster.pid, signal.SIGKILL)


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return postgres_cluster.create_database()


# -- digits baseline -------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_data() -> DigitsData:
    from sklearn.datasets import load_digits

    from modelloop.training.baseline import build_baseline

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    half = len(x) // 2
    onehot = np.eye(10, dtype=np.float32)[y[:half]]
    baseline = build_baseline(
        x_train=x[:half],
        feature_names=[f"pixel_{i // 8}_{i % 8}" for i in range(64)],
        input_name="pixels",
        task="multiclass",
        val_outputs=onehot,
        class_labels=[str(i) for i in range(10)],
        seed=0,
    )
    return DigitsData(x[:half], y[:half], x[half:], y[half:], baseline)
