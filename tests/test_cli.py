"""The real ``modelloop`` command in a subprocess: help, errors, and train -> export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SPECS = Path(__file__).resolve().parent / "testdata" / "specs"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "modelloop", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("modelloop: error: ")
    assert message in last


def test_help_lists_the_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "export", "up"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["train", "digits"],  # --out missing
        ["train", "digits", "--out", "x", "--epochs", "0"],
        ["train", "digits", "--out", "x", "--folds", "1"],
        ["train", "digits", "--out", "x", "--tune", "0"],
        ["train", "digits", "--out", "x", "--tune", "many"],
        ["export"],
        ["up", "--rest-port", "70000"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2_with_usage(args):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr


def test_unknown_spec(tmp_path):
    assert_one_line_error(run_cli("train", "nope", "--out", str(tmp_path / "r")), "unknown spec 'nope'")
    assert not (tmp_path / "r").exists()


def test_tune_needs_a_search_space(tmp_path):
    proc = run_cli("train", str(SPECS / "functional_spec.py"), "--out", str(tmp_path / "r"), "--tune", "3")
    assert_one_line_error(proc, "declares no SEARCH_SPACE")
    assert not (tmp_path / "r").exists()


def test_tune_is_not_distributed(tmp_path):
    proc = run_cli("train", "digits", "--out", str(tmp_path / "r"), "--tune", "3", "--distributed")
    assert_one_line_error(proc, "--tune cannot be combined with --distributed")


def test_spec_file_without_required_parts(tmp_path):
    proc = run_cli("train", str(SPECS / "missing_parts_spec.py"), "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "lacks required part(s): build_model")


def test_export_of_a_missing_run(tmp_path):
    proc = run_cli("export", str(tmp_path / "none"), "--repo", str(tmp_path / "repo"))
    assert_one_line_error(proc, "does not exist")


def test_export_of_a_corrupt_run(digits_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "model.keras").write_bytes(b"not a zip")
    proc = run_cli("export", str(run), "--repo", str(tmp_path / "repo"))
    assert_one_line_error(proc, "cannot load")
    assert not list((tmp_path / "repo").glob("*/[0-9]*"))


@pytest.mark.parametrize("name", ["../up", "a/b", "bad name"])
def test_export_with_a_bad_name(digits_run, tmp_path, name):
    proc = run_cli("export", str(digits_run), "--repo", str(tmp_path / "repo"), "--name", name)
    assert_one_line_error(proc, "invalid model name")
    assert not (tmp_path / "repo").exists()


def test_export_into_an_unwritable_repo(digits_run, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli("export", str(digits_run), "--repo", str(tmp_path / "file" / "repo"))
    assert_one_line_error(proc, "cannot be created")


@pytest.mark.slow
def test_train_then_export_through_the_cli(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        "train", str(SPECS / "functional_spec.py"), "--out", str(run), "--epochs", "3", "--seed", "1"
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == str(run)
    assert json.loads((run / "metrics.json").read_text())["seed"] == 1

    repo = tmp_path / "repo"
    proc = run_cli("export", str(run), "--repo", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(repo / "blobs-functional" / "1")
    assert "parity passed" in proc.stderr


@pytest.mark.slow
def test_concurrent_cli_exports_get_distinct_versions(digits_run, tmp_path):
    repo = tmp_path / "repo"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "modelloop", "export", str(digits_run), "--repo", str(repo)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            outputs.append(out.strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(outputs) == [str(repo / "digits" / "1"), str(repo / "digits" / "2")]
    for v in (1, 2):
        meta = json.loads((repo / "digits" / str(v) / "model.json").read_text())
        assert meta["version"] == v
        assert (repo / "digits" / str(v) / "model.onnx").stat().st_size > 1000


@pytest.mark.parametrize("workers", ["0", "-1", "many", "2.5", ""])
@pytest.mark.parametrize("command", ["serve", "up"])
def test_bad_worker_counts_are_one_line_errors(tmp_path, command, workers):
    proc = run_cli(
        command, "--repo", str(tmp_path), "--workers", workers, "--rest-port", "0", "--grpc-port", "0"
    )
    assert_one_line_error(proc, "invalid --workers")


def test_worker_arguments_round_trip():
    from modelloop.arguments import build_parser, worker_argv

    parser = build_parser()
    given = [
        "serve", "--repo", "models", "--host", "::1", "--poll-interval", "0.5", "--grace-period", "3",
        "--log-level", "DEBUG", "--store", "sqlite:///x.db", "--state-dir", "st", "--no-monitoring",
        "--workers", "4", "--max-loaded-models", "10",
    ]  # fmt: skip
    args = parser.parse_args(given)
    again = parser.parse_args(["serve", *worker_argv(args)])
    names = (
        "repo",
        "host",
        "poll_interval",
        "grace_period",
        "log_level",
        "store",
        "state_dir",
        "max_loaded_models",
    )
    for name in (*names, "no_monitoring", "tls_cert", "tls_key"):
        assert getattr(again, name) == getattr(args, name), name
    assert again.workers == "1"  # a worker is one process


def test_a_busy_port_fails_before_any_worker_starts(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--repo", str(tmp_path), "--workers", "2", "--rest-port", str(port))
        assert_one_line_error(proc, f"cannot bind REST port 127.0.0.1:{port}")
        assert "worker 0 started" not in proc.stderr
    finally:
        busy.close()


def test_auto_workers_are_the_cpus_this_process_may_use():
    from modelloop.arguments import worker_count
    from modelloop.serving.cpus import cpu_budget

    assert worker_count("auto") == worker_count(" AUTO ") == cpu_budget().count
    assert worker_count("3") == 3
