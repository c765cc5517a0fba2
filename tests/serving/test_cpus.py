"""The CPU budget of a process (affinity, cgroup quota) and ONNX Runtime's pools sized to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from modelloop.serving.cpus import budget_from, cgroup_quota, cpu_budget, parse_cfs, parse_cpu_max


def test_the_quota_caps_the_affinity_rounded_up() -> None:
    assert budget_from(16, 1.5).count == 2
    assert budget_from(16, 0.2).count == 1
    assert budget_from(2, 8.0).count == 2
    assert budget_from(4, None).count == 4
    assert budget_from(0, None).count == 1
    assert budget_from(16, 2.0).count == 2
    assert budget_from(16, 1.5).describe() == "2 CPUs (affinity 16, cgroup quota 1.5)"


def test_cgroup_files_parse() -> None:
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("50000\n", "100000\n") == 0.5


def test_cgroup_v2_takes_the_tightest_limit_up_the_hierarchy(tmp_path: Path) -> None:
    (tmp_path / "kubepods" / "pod1" / "ctr").mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "ctr" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, "0::/kubepods/pod1/ctr\n") == 2.5
    # A namespaced container sees its own cgroup as "/" and the limit at the root.
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cgroup_quota(tmp_path, "0::/\n") == 1.0
    assert cgroup_quota(tmp_path / "missing", "0::/x\n") is None


def test_cgroup_v1_reads_cfs_quota_and_period(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("150000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_quota(tmp_path, proc) == 1.5
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path, proc) is None


def test_this_process_budget_is_within_its_affinity() -> None:
    budget = cpu_budget()
    assert 1 <= budget.count <= len(os.sched_getaffinity(0)) == budget.affinity


# Loads the digits model the way the registry does, in a child confined to CPU 0, and
# prints the settings ONNX Runtime reports and the affinity of every thread it started.
_CHILD = r"""
import json, os, sys
from pathlib import Path
os.sched_setaffinity(0, {0})
import numpy as np
import onnxruntime  # its import starts a thread of its own; count the session's from here
from modelloop.serving.servable import create_runtime
from modelloop.serving.repository import ModelRepository
from modelloop.serving.settings import ModelConfig, ServingSettings

repo = Path(sys.argv[1])
config = ModelConfig.model_validate_json(sys.argv[2])
settings = ServingSettings(repo=repo, workers=int(sys.argv[3]))
before = set(os.listdir("/proc/self/task"))
metadata = ModelRepository.read_metadata(repo / "digits" / "1", "digits", 1, "onnxruntime_onnx")
runtime = create_runtime("onnx", repo / "digits" / "1", metadata, config, settings)
runtime.load()
runtime.predict({"pixels": np.zeros((4, 64), np.float32)})
options = runtime._session.get_session_options()
threads = {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(json.dumps({
    "parameters": runtime.parameters,
    "intra": options.intra_op_num_threads,
    "spin": options.get_session_config_entry("session.intra_op.allow_spinning"),
    "new_threads": len(set(threads) - before),
    "affinities": sorted({tuple(a) for a in threads.values()}),
}))
"""


def _load_confined(repo: Path, config: str = "{}", workers: int = 1) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(repo), config, str(workers)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_onnx_runtime_pools_are_sized_to_the_process_and_do_not_spin(digits_repo: Path) -> None:
    loaded = _load_confined(digits_repo)
    assert loaded["intra"] == 1
    assert loaded["spin"] == "0"
    assert loaded["parameters"]["intra_op_num_threads"] == "1"
    assert loaded["parameters"]["allow_spinning"] == "false"
    assert loaded["parameters"]["thread_sizing"].startswith("1 CPU (affinity 1")
    # One intra-op thread means the caller's thread: the pool starts none of its own.
    assert loaded["new_threads"] == 0
    assert loaded["affinities"] == [[0]]


def test_explicit_threads_and_spinning_stay_inside_the_affinity(digits_repo: Path) -> None:
    loaded = _load_confined(digits_repo, '{"intra_op_num_threads": 2, "allow_spinning": true}')
    assert loaded["intra"] == 2
    assert loaded["spin"] == "1"
    assert loaded["parameters"]["thread_sizing"] == "set in config"
    assert loaded["new_threads"] >= 1
    # ONNX Runtime's own default pins its threads to cores of its choosing; a count we set
    # leaves them on the process's affinity.
    assert loaded["affinities"] == [[0]]


def test_workers_share_the_cpus(digits_repo: Path) -> None:
    workers = len(os.sched_getaffinity(0)) + 1
    loaded = _load_confined(digits_repo, workers=workers)
    assert loaded["intra"] == 1
    assert f"/ {workers} workers" in loaded["parameters"]["thread_sizing"]
