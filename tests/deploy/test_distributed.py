"""Training past one machine: two real workers on loopback agree on the trained weights.

Each worker is a separate ``modelloop train digits --distributed`` process, as it would
be a separate pod of the Indexed Job in k8s/training/. Worker 0 gets TF_CONFIG directly;
worker 1 derives it from JOB_COMPLETION_INDEX and MODELLOOP_WORKER_HOSTS, the way the
Kubernetes Job does.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelloop.cli import main
from modelloop.training.distributed import (
    DistributedConfigError,
    tf_config_from_index,
    weights_digest,
    worker_role,
)

# Tens of seconds or more: `make test-fast` leaves it out.
pytestmark = pytest.mark.slow

_DIGEST = re.compile(r"worker (\d)/2: trained digits, .*; weights sha256 ([0-9a-f]{64})")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Started worker processes; any still running at teardown are killed by PID."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_two_workers_train_the_same_model(tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    out = tmp_path / "run"
    base_env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",  # both workers on CPU, even on a GPU machine
    }
    base_env.pop("TF_CONFIG", None)
    envs = [
        {
            **base_env,
            "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 0}}),
        },
        {**base_env, "JOB_COMPLETION_INDEX": "1", "MODELLOOP_WORKER_HOSTS": ",".join(hosts)},
    ]
    flags = [["--distributed"], ["--tf-config-from-index"]]
    for env, flag in zip(envs, flags, strict=True):
        cmd = [
            sys.executable,
            "-m",
            "modelloop",
            "train",
            "digits",
            "--out",
            str(out),
            "--epochs",
            "3",
            *flag,
        ]
        processes.append(
            subprocess.Popen(
                cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    for proc in processes:
        stdout, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, stdout[-3000:]
        outputs.append(stdout)

    digests = {}
    for stdout in outputs:
        match = _DIGEST.search(stdout)
        assert match, stdout[-2000:]
        digests[int(match.group(1))] = match.group(2)
    assert set(digests) == {0, 1}
    # The gradients are all-reduced every step, so the workers end bit-for-bit equal.
    assert digests[0] == digests[1]

    # Only the chief wrote the run directory, and it holds the model both workers trained.
    assert outputs[0].strip().splitlines()[-1] == str(out)
    assert "written by worker 0" in outputs[1]
    for name in ("model.keras", "metrics.json", "run.json", "baseline.json", "split.npz"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3
    assert metrics["test"]["accuracy"] > 0.5  # three epochs of digits: well above chance

    import keras

    assert weights_digest(keras.saving.load_model(out / "model.keras")) == digests[0]


def test_tf_config_from_index() -> None:
    env = {"MODELLOOP_WORKER_HOSTS": "w-0.train:2222, w-1.train:2222", "JOB_COMPLETION_INDEX": "1"}
    config = tf_config_from_index(env)
    assert config == {
        "cluster": {"worker": ["w-0.train:2222", "w-1.train:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    role = worker_role({"TF_CONFIG": json.dumps(config)})
    assert (role.index, role.num_workers, role.is_chief) == (1, 2, False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOB_COMPLETION_INDEX": "0"}, "MODELLOOP_WORKER_HOSTS"),
        ({"MODELLOOP_WORKER_HOSTS": "a:1,b:1"}, "JOB_COMPLETION_INDEX"),
        ({"MODELLOOP_WORKER_HOSTS": "a:1,b:1", "JOB_COMPLETION_INDEX": "2"}, "outside"),
        ({"MODELLOOP_WORKER_HOSTS": "a:1,b:1", "JOB_COMPLETION_INDEX": "x"}, "not an integer"),
        ({"MODELLOOP_WORKER_HOSTS": "a,b", "JOB_COMPLETION_INDEX": "0"}, "host:port"),
    ],
)
def test_tf_config_from_index_rejects(env: dict[str, str], message: str) -> None:
    with pytest.raises(DistributedConfigError, match=message):
        tf_config_from_index(env)


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        (None, "needs TF_CONFIG"),
        ("{not json", "malformed"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "workers only"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "outside"),
    ],
)
def test_worker_role_rejects(tf_config: str | None, message: str) -> None:
    env = {} if tf_config is None else {"TF_CONFIG": tf_config}
    with pytest.raises(DistributedConfigError, match=message):
        worker_role(env)


def test_cli_distributed_without_tf_config_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert main(["train", "digits", "--out", str(tmp_path / "r"), "--distributed"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelloop: error: --distributed needs TF_CONFIG")
    assert "\n" not in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "digits", "--out", str(tmp_path / "r"), "--distributed", "--folds", "3"]) == 1
    assert "--folds cannot be combined" in capsys.readouterr().err
