"""Three points beside the suite: tensors through shared memory, cold loads in bounded memory,
and the prediction logger's own CPU.

- ``shared_memory``: a 4 MiB float32 input (16384 digits rows) per request to ``digits``,
  sent by tritonclient's HTTP client through a registered system shared memory region
  (output too), against the same request as binary tensors in the HTTP body. One request at
  a time; CPU per request of the server (``/proc``) and of the client, and requests per second.
- ``cold_load``: ``serve --max-loaded-models 1`` over two copies of ``digits``; requests
  alternate between them, so every request loads its model (after unloading the other).
  Client-side latency p50/p99 of those cold requests, next to warm ones, and the server's
  ``modelloop_model_cold_load_seconds`` mean.
- ``prediction_logger``: the logger's CPU per logged prediction, in process, logging on
  against a null observer over the same requests (``bench/predlog.py``; target 5 µs).

Run ``python -m bench.points [--requests N] [--repo REPO]`` (``make bench`` runs it after the
suite); it prints a table and writes ``bench/results/points-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import predlog
from bench.models import ensure_digits
from bench.processes import ROOT, start

TOKEN = "bench-admin-token"
SHM_ROWS = 16384  # x 64 float32 = 4 MiB
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"


def _serve(repo: Path, *extra: str, name: str) -> Any:
    args = ["-m", "modelloop", "serve", "--repo", str(repo), "--rest-port", "0", "--grpc-port", "0"]
    env = {"MODELLOOP_ADMIN_TOKEN": TOKEN, "MODELLOOP_MONITORING_TRIGGER": "none"}
    return start(name, [*args, "--no-monitoring", *extra], env=env)


def _copy_digits(repo: Path, target: Path, names: list[str], batching: dict[str, Any] | None) -> Path:
    for name in names:
        shutil.copytree(repo / "digits" / "1", target / name / "1")
        card = json.loads((target / name / "1" / "model.json").read_text())
        card["name"] = name
        (target / name / "1" / "model.json").write_text(json.dumps(card))
        if batching is not None:
            (target / name / "config.json").write_text(json.dumps({"batching": batching}))
    return target


def shared_memory_point(repo: Path, tmp: Path, requests: int) -> list[dict[str, Any]]:
    """Shared memory against binary tensors over HTTP, one 4 MiB request at a time."""
    batching = {"max_batch_size": SHM_ROWS, "batch_timeout_micros": 0}
    served = _copy_digits(repo, tmp / "shm-repo", ["digits"], batching)
    proc = _serve(served, name="shm")  # the default body limit (64 MiB) takes 4 MiB
    rows: list[dict[str, Any]] = []
    try:
        target = proc.rest_url.removeprefix("http://")
        for mode in ("binary", "shm"):
            cpu0 = proc.cpu_seconds()
            done = subprocess.run(
                [
                    str(CLIENTS_PYTHON),
                    str(ROOT / "bench" / "shm_client.py"),
                    *(target, TOKEN, str(SHM_ROWS), str(requests), mode),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"shm client ({mode}) failed:\n{done.stderr[-3000:]}")
            server_cpu = proc.cpu_seconds() - cpu0
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "point": f"4 MiB FP32 input, HTTP {'shared memory' if mode == 'shm' else 'binary body'}",
                    "requests": requests,
                    "req_per_s": requests / result["wall_s"],
                    "server_cpu_ms_per_request": 1000 * server_cpu / (requests + 1),
                    "client_cpu_ms_per_request": 1000 * result["client_cpu_s"] / requests,
                    "output_checksum": result["output_checksum"],
                }
            )
    finally:
        proc.stop()
    return rows


def _post(url: str, body: bytes) -> float:
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    start_s = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - start_s


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cold_load_point(repo: Path, tmp: Path, requests: int) -> dict[str, Any]:
    """Cold-load latency of digits with room for one model and two to serve."""
    served = _copy_digits(repo, tmp / "cold-repo", ["digits_a", "digits_b"], None)
    proc = _serve(served, "--max-loaded-models", "1", name="cold")
    body = json.dumps(
        {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    )
    try:
        cold = [
            _post(f"{proc.rest_url}/v2/models/{name}/infer", body.encode())
            for name in ["digits_a", "digits_b"] * (requests // 2)
        ]
        warm = [_post(f"{proc.rest_url}/v2/models/digits_b/infer", body.encode()) for _ in range(requests)]
        with urllib.request.urlopen(f"{proc.rest_url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        proc.stop()
    total = count = 0.0
    for line in metrics.splitlines():
        if match := re.match(r"modelloop_model_cold_load_seconds_(sum|count)\{[^}]*\} (\S+)", line):
            if match.group(1) == "sum":
                total += float(match.group(2))
            else:
                count += float(match.group(2))
    return {
        "point": "cold load of digits (--max-loaded-models 1, two models alternating)",
        "requests": len(cold),
        "cold_p50_ms": 1000 * _quantile(cold, 0.5),
        "cold_p99_ms": 1000 * _quantile(cold, 0.99),
        "warm_p50_ms": 1000 * _quantile(warm, 0.5),
        "warm_p99_ms": 1000 * _quantile(warm, 0.99),
        "server_cold_load_mean_ms": 1000 * total / count if count else None,
        "server_cold_loads": count,
        "cold_mean_ms": 1000 * statistics.fmean(cold),
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the points; prints them and writes the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.points", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per point (default 40)")
    parser.add_argument(
        "--repo", type=Path, default=None, help="a repository with digits (default: bench cache)"
    )
    parser.add_argument(
        "--log-requests", type=int, default=50_000, help="requests per round of the logger point"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    repo = args.repo if args.repo is not None else ensure_digits()[1]
    with tempfile.TemporaryDirectory(prefix="modelloop-points-") as tmp:
        shm = shared_memory_point(repo, Path(tmp), args.requests)
        cold = cold_load_point(repo, Path(tmp), args.requests)
    logged = predlog.measure(args.log_requests, "sql")
    for row in shm:
        print(
            f"{row['point']:<45} {row['req_per_s']:8.1f} req/s  "
            f"server {row['server_cpu_ms_per_request']:7.2f} ms CPU/req  "
            f"client {row['client_cpu_ms_per_request']:7.2f} ms CPU/req"
        )
    print(
        f"{cold['point']}: cold p50 {cold['cold_p50_ms']:.1f} ms, p99 {cold['cold_p99_ms']:.1f} ms "
        f"(warm p50 {cold['warm_p50_ms']:.2f} ms, p99 {cold['warm_p99_ms']:.2f} ms; "
        f"{cold['server_cold_loads']:.0f} loads, server mean {cold['server_cold_load_mean_ms']:.1f} ms)"
    )
    verdict = "met" if logged["logger_us_per_prediction"] <= logged["target_us"] else "NOT met"
    print(
        f"{logged['point']}: {logged['logger_us_per_prediction']:.2f} µs CPU per logged prediction "
        f"(on {logged['on_us_per_prediction']:.2f}, off {logged['off_us_per_prediction']:.2f}; "
        f"target ≤ {logged['target_us']:.0f} µs: {verdict})"
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"points-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "timestamp": stamp,
                "shared_memory": shm,
                "cold_load": cold,
                "prediction_logger": logged,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
