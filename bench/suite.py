"""The suite: generate the models, start every server, measure every point, report.

Usage::

    python -m bench                 # every point, 10 s each after a 2 s warm-up (~6 minutes)
    python -m bench --quick         # 3 s per point (~2 minutes)
    python -m bench --soak          # also the 60 s RSS run at 32 connections
    python -m bench --only ours,ceiling --protocols tfserving_rest
    python -m bench --compare-tree before=/tmp/before   # also serve an older checkout, side by side
    python -m bench --tracing       # also this code with tracing on (OTLP to a discarding sink)

The server under test and every reference server run pinned to CPU 0; ``wrk`` and
``h2load`` run pinned to CPU 1. Compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen, payloads, peers, processes, profile
from bench.loadgen import GRPC_PATHS, LoadResult
from bench.models import HEAVY_BATCHING, Assets, ensure_assets
from bench.otlp_sink import otlp_sink
from bench.processes import Proc
from bench.report import Report, Row, render_markdown, write_chart, write_json, write_markdown

RESULTS = Path(__file__).resolve().parent / "results"
GENERATED = Path(__file__).resolve().parents[1] / "docs" / "generated" / "bench.md"
"""The page of the last run's table that the docs link to."""
PROTOCOLS = ("tfserving_rest", "v2_rest", "tfserving_grpc", "v2_grpc")
PROTOCOL_LABELS = {
    "tfserving_rest": "TF Serving REST :predict",
    "v2_rest": "OIP V2 REST infer",
    "tfserving_grpc": "TF Serving gRPC Predict",
    "v2_grpc": "OIP gRPC ModelInfer",
}
GROUPS = ("ort", "ours", "ceiling", "tutorial", "heavy")
HEAVY_CONNECTIONS = 64
HEAVY_ROWS = 32
"""Rows per request of the heavy model's many-row point (one full batch per request)."""
HEAVY_ROWS_CONNECTIONS = 8
CPU_PROVIDERS = ["CPUExecutionProvider"]
GPU_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def gpu_repo(repo: Path, target: Path) -> Path:
    """A copy of the heavy repository whose models ask for CUDA first (``--gpu``)."""
    shutil.copytree(repo, target)
    for config in target.glob("*/config.json"):
        data = json.loads(config.read_text())
        data["onnx_providers"] = GPU_PROVIDERS
        config.write_text(json.dumps(data, indent=2) + "\n")
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The suite's command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="modelloop benchmark suite")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per point (default 2)")
    parser.add_argument("--quick", action="store_true", help="3 s per point, 1 s warm-up: about 2 minutes")
    parser.add_argument(
        "--soak", action="store_true", help="also measure RSS over a 60 s run at 32 connections"
    )
    parser.add_argument("--soak-duration", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--connections", default="1,32", help="connection counts of the digits points")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"groups to run, of {','.join(GROUPS)}")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="digits protocols to run")
    parser.add_argument(
        "--compare-tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve another checkout's code (e.g. a git worktree) as NAME, side by side; repeatable",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also serve this code with extra `modelloop serve` args as NAME, e.g. nomon=--no-monitoring",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also serve this code with tracing on (OTLP/HTTP to a discarding sink) as 'traced'",
    )
    parser.add_argument(
        "--heavy-workers", default="1,2", help="worker counts of the heavy model's batched point"
    )
    parser.add_argument("--tutorial-connections", type=int, default=32)
    parser.add_argument("--tutorial-duration", type=float, default=5.0, help="its points are slow: cap them")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="heavy model on CUDA (server and in-process); see bench/gpu_check.sh",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also serve the digits model with KServe and MLServer (own virtualenvs, made on first use)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each point of ours (and the no-op references), a py-spy run: the per-request budget",
    )
    parser.add_argument(
        "--flame", action="store_true", help="with --profile, also write a flame graph (SVG) per point"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=GENERATED,
        help="where the run's table goes (docs/generated/bench.md)",
    )
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default bench/.cache)")
    args = parser.parse_args(argv)
    # --quick sets the defaults; an explicit --duration or --warmup still wins.
    quick = args.quick
    args.duration = args.duration if args.duration is not None else (3.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.only = {g.strip() for g in args.only.split(",") if g.strip()}
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    args.connections = [int(c) for c in args.connections.split(",")]
    args.heavy_workers = [int(c) for c in args.heavy_workers.split(",") if c.strip()]
    trees = []
    for item in args.compare_tree:
        name, eq, path = item.partition("=")
        if not eq or not name.isidentifier() or name in ("ours", "ceiling_rest", "ceiling_grpc"):
            parser.error(f"--compare-tree takes NAME=DIR with a new identifier NAME, got {item!r}")
        trees.append((name, Path(path).resolve()))
    args.compare_tree = trees
    variants = []
    for item in args.variant:
        name, eq, extra = item.partition("=")
        if not eq or not name.isidentifier() or name in ("ours", "ceiling_rest", "ceiling_grpc", "traced"):
            parser.error(f"--variant takes NAME=ARGS with a new identifier NAME, got {item!r}")
        variants.append((name, shlex.split(extra)))
    if args.tracing:
        variants.append(("traced", []))
    args.variant = variants
    unknown = (args.only - set(GROUPS)) | (set(args.protocols) - set(PROTOCOLS))
    if unknown:
        parser.error(f"unknown group or protocol: {', '.join(sorted(unknown))}")
    return args


def machine_info() -> dict[str, object]:
    """CPU model, core count, kernel, Python and the load tools' versions."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "server_cpu": processes.SERVER_CPU,
        "load_cpu": loadgen.LOAD_CPU,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": version(["wrk", "-v"]),
        "h2load": version(["h2load", "--version"]),
    }


def serve_args(repo: Path) -> list[str]:
    """``modelloop serve`` on port 0 with its defaults (what a user runs)."""
    return ["-m", "modelloop", "serve", "--repo", str(repo), "--rest-port", "0", "--grpc-port", "0"]


def state_env(name: str) -> dict[str, str]:
    """A private monitoring state directory per server, and no retraining.

    No two servers share one SQLite file. Monitoring stays on (logging, drift, accuracy),
    but its rules would see the one repeated row as drift and start a retrain: a training
    child on the server's CPU, counted in its CPU time, that publishes into the cache.
    """
    path = Path(tempfile.gettempdir()) / f"modelloop-bench-state-{os.getpid()}" / name
    shutil.rmtree(path, ignore_errors=True)
    return {"MODELLOOP_MONITORING_STATE_DIR": str(path), "MODELLOOP_MONITORING_TRIGGER": "none"}


def start_control_plane(repo: Path, env: dict[str, str]) -> Proc:
    """``modelloop monitor`` on the load CPU (its CPU is not the server's), on ``env``'s state."""
    argv = ["-m", "modelloop", "monitor", "--repo", str(repo), "--port", "0"]
    proc = processes.start("monitor", argv, needs=(), ready_path=None, env=env, cpu=loadgen.LOAD_CPU)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"control plane listening on (http://\S+)", proc.output())
        if found:
            proc.rest_url = found.group(1)
            return proc
        if proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"the control plane did not start:\n{proc.output()[-4000:]}")


def start_tree_server(tree: Path, repo: Path, site: Path) -> Proc:
    """Serves ``repo`` with the code of another checkout, by shadowing the editable install.

    ``site/modelloop`` mirrors the checkout's package layout (``modelloop/`` plus the
    top-level folders mapped into it), and ``PYTHONPATH`` puts it before the editable finder.
    """
    pkg = site / "modelloop"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(tree / "modelloop", pkg)
    for sub in ("serving", "training", "export", "monitoring", "control"):
        if (tree / sub).is_dir():
            (pkg / sub).symlink_to(tree / sub)
    # cwd=site: with the repository as cwd, sys.path[0] would find its own modelloop first.
    env = {"PYTHONPATH": str(site), **state_env(site.name)}
    return processes.start(site.name, serve_args(repo), env=env, cwd=site)


def preflight(proc: Proc, protocol: str, body: Path, model: str) -> None:
    """One real request through each endpoint before it is measured, so a bad body fails loudly.

    Raises:
        RuntimeError: The endpoint did not answer a valid response.
    """
    data = body.read_bytes()
    if protocol.endswith("_rest"):
        path = rest_path(protocol, model)
        request = urllib.request.Request(
            proc.rest_url + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
        except OSError as exc:
            raise RuntimeError(f"{proc.name}: {protocol} preflight failed: {exc}") from exc
        if "predictions" not in answer and "outputs" not in answer:
            raise RuntimeError(f"{proc.name}: {protocol} preflight got {answer}")
        return
    import grpc

    target = proc.grpc_url.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(GRPC_PATHS[protocol])
        try:
            reply = call(data[5:], timeout=30)
        except grpc.RpcError as exc:
            raise RuntimeError(f"{proc.name}: {protocol} preflight failed: {exc}") from exc
    if not reply:
        raise RuntimeError(f"{proc.name}: {protocol} preflight got an empty reply")


def rest_path(protocol: str, model: str) -> str:
    """The URL path of a REST protocol's inference route."""
    return f"/v1/models/{model}:predict" if protocol == "tfserving_rest" else f"/v2/models/{model}/infer"


def server_errors(proc: Proc) -> int:
    """Requests ``/metrics`` counts with a code other than OK (0 for servers without metrics).

    h2load only sees HTTP status, and gRPC failures travel in trailers with HTTP 200, so
    the server's own counter is the error count that matters for gRPC points.
    """
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(proc.rest_url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return 0
    total = 0
    for family in text_string_to_metric_families(text):
        if family.name == "modelloop_requests":
            for sample in family.samples:
                # CANCELLED: the load generator hung up on calls in flight when its time ran out.
                if sample.name.endswith("_total") and sample.labels.get("code") not in ("OK", "CANCELLED"):
                    total += int(sample.value)
    return total


def measure(
    proc: Proc, protocol: str, body: Path, model: str, connections: int, duration_s: float, warmup_s: float
) -> LoadResult:
    """Warm-up, then one bounded measurement of one endpoint."""

    def run(seconds: float) -> LoadResult:
        if protocol.endswith("_rest"):
            return loadgen.run_wrk(
                proc.rest_url, rest_path(protocol, model), body, connections=connections, duration_s=seconds
            )
        return loadgen.run_h2load(
            proc.grpc_url, GRPC_PATHS[protocol], body, connections=connections, duration_s=seconds
        )

    if warmup_s > 0:
        run(warmup_s)
    has_metrics = not proc.name.startswith(("ceiling", "tutorial", *(p.name for p in peers.PEERS)))
    before = server_errors(proc) if has_metrics else 0
    cpu_before = proc.cpu_seconds()
    result = run(duration_s)
    cpu = proc.cpu_seconds() - cpu_before
    if has_metrics:
        result.errors = max(result.errors, server_errors(proc) - before)
    # Read around the measured run only: what the server spent per request it answered
    # (the /metrics scrape above is a handful of requests against thousands).
    result.cpu_us = cpu / result.requests * 1e6 if result.requests else None
    return result


PROFILED = ("ours", "nomon", "ceiling_asgi", "ceiling_grpc")
"""The servers ``--profile`` samples (every compared tree too)."""


def profile_point(
    proc: Proc, protocol: str, body: Path, connections: int, duration_s: float, out: Path, flame: bool = False
) -> profile.Budget:
    """The per-request budget of one endpoint: py-spy on the load CPU while the load runs."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{proc.name}-{protocol}-c{connections}"
    results: list[LoadResult] = []

    def load() -> None:
        if protocol.endswith("_rest"):
            results.append(
                loadgen.run_wrk(
                    proc.rest_url, rest_path(protocol, "digits"), body, connections=connections,
                    duration_s=duration_s,
                )
            )  # fmt: skip
        else:
            results.append(
                loadgen.run_h2load(
                    proc.grpc_url, GRPC_PATHS[protocol], body, connections=connections, duration_s=duration_s
                )
            )

    cpu_before = proc.cpu_seconds()
    stacks = profile.record(
        proc.pid, duration_s, stem.with_suffix(".txt"), load, cpu=loadgen.LOAD_CPU, flame=flame
    )
    cpu = proc.cpu_seconds() - cpu_before
    requests = sum(r.requests for r in results)
    cpu_us = cpu / requests * 1e6 if requests else 0.0
    return profile.budget_from_stacks(f"{proc.name} {protocol}", stacks, cpu_us)


def row_from(
    key: str, label: str, group: str, connections: int, result: LoadResult, note: str = "", rows: int = 1
) -> Row:
    """A table row from a load result."""
    return Row(
        key=key,
        label=label,
        group=group,
        connections=connections,
        throughput=result.requests_per_s,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.errors,
        requests=result.requests,
        duration_s=result.duration_s,
        note=note,
        cpu_us=result.cpu_us,
        rows_per_request=rows,
    )


def ort_row(key: str, label: str, batch: int, r: dict[str, Any]) -> Row:
    """A table row from an in-process measurement (rows/s; latency of one ``session.run``)."""
    return Row(
        key=key,
        label=label,
        group="reference",
        connections=None,
        throughput=r["rows_per_s"],
        unit="rows/s",
        p50_ms=r["p50_ms"],
        p99_ms=r["p99_ms"],
        requests=int(r["calls"]),
        duration_s=r["duration_s"],
        rows_per_request=batch,
        note=f"p50/p99: one session.run call; {r.get('provider', '')}",
    )


def inprocess(
    model: Path, batch: int, duration_s: float, warmup_s: float, providers: list[str] | None = None
) -> dict[str, Any]:
    """In-process ONNX Runtime, pinned to the server CPU."""
    cmd = [
        "taskset", "-c", str(processes.SERVER_CPU), sys.executable, "-m", "bench.inprocess", str(model),
        "--batch", str(batch), "--duration", str(duration_s), "--warmup", str(warmup_s),
        "--providers", ",".join(providers or CPU_PROVIDERS), "--server-options",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=processes.ROOT, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def running(start: Callable[[], Proc]) -> Iterator[Proc]:
    """Starts a server and stops it by PID on the way out."""
    proc = start()
    try:
        yield proc
    finally:
        proc.stop()


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps just the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_suite(args: argparse.Namespace, assets: Assets, bodies_dir: Path, report: Report) -> None:
    """Measures every selected point into ``report.rows``."""
    d, w = args.duration, args.warmup
    row = payloads.sample_row(payloads.DIGITS_FEATURES)
    bodies = payloads.write_bodies(bodies_dir, "digits", "pixels", row)
    heavy_rows = payloads.sample_row(payloads.HEAVY_FEATURES)
    heavy_bodies = payloads.write_bodies(bodies_dir, "heavy", "pixels", heavy_rows)
    unbatched_bodies = payloads.write_bodies(bodies_dir, "heavy_unbatched", "pixels", heavy_rows)

    if "ort" in args.only:
        for batch in (1, 32):
            log(f"in-process ONNX Runtime, digits, batch {batch}")
            r = inprocess(assets.digits_onnx, batch, d, w)
            report.rows.append(
                ort_row(f"ort.digits.b{batch}", f"in-process ORT digits, batch {batch}", batch, r)
            )

    if args.only & {"ours", "ceiling"}:
        with contextlib.ExitStack() as stack:
            servers: dict[str, Proc] = {}
            if "ours" in args.only:
                log("starting modelloop serve (digits)")
                servers["ours"] = stack.enter_context(
                    running(
                        lambda: processes.start("ours", serve_args(assets.digits_repo), env=state_env("ours"))
                    )
                )
                ours = servers["ours"]
                report.rss = {"launch_bytes": ours.rss_bytes()}
                report.startup = {
                    "ready_s": ours.ready_s,
                    "rss_mib": report.rss["launch_bytes"] / 2**20,
                    "tensorflow": tensorflow_loaded(ours.pid),
                }
                for tree_name, tree in args.compare_tree:
                    site = Path(stack.enter_context(tempfile.TemporaryDirectory())) / tree_name
                    site.mkdir()
                    servers[tree_name] = stack.enter_context(
                        running(
                            lambda tree=tree, site=site: start_tree_server(tree, assets.digits_repo, site)
                        )
                    )
                traced: dict[str, str] = {}
                if args.tracing:
                    # Tracing on, every span exported over OTLP/HTTP to a sink that discards.
                    sink = stack.enter_context(otlp_sink())
                    stack.callback(lambda: log(f"OTLP sink: {sink.posts} posts, {sink.bytes:,} bytes"))
                    traced = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url}
                # Monitoring's cost on the serving CPU: the same server with no monitoring,
                # and one that only logs while a control plane (on the load CPU, not
                # counted) reads the log.
                servers["nomon"] = stack.enter_context(
                    running(
                        lambda: processes.start(
                            "nomon",
                            [*serve_args(assets.digits_repo), "--no-monitoring"],
                            env=state_env("nomon"),
                        )
                    )
                )
                split_env = state_env("split")
                plane = stack.enter_context(
                    running(lambda: start_control_plane(assets.digits_repo, split_env))
                )
                servers["split"] = stack.enter_context(
                    running(
                        lambda: processes.start(
                            "split",
                            [*serve_args(assets.digits_repo), "--control-plane", plane.rest_url],
                            env=split_env,
                        )
                    )
                )
                for variant, extra in args.variant:
                    env = {**state_env(variant), **(traced if variant == "traced" else {})}
                    servers[variant] = stack.enter_context(
                        running(
                            lambda variant=variant, extra=extra, env=env: processes.start(
                                variant, [*serve_args(assets.digits_repo), *extra], env=env
                            )
                        )
                    )
            if args.peers and "ours" in args.only:
                for peer in peers.PEERS:
                    log(f"starting {peer.name} (its virtualenv is made on first use)")
                    python = peers.ensure_venv(peer)
                    servers[peer.name] = stack.enter_context(
                        running(
                            lambda peer=peer, python=python: processes.start(
                                peer.name, peers.server_args(peer, assets.digits_onnx), python=python
                            )
                        )
                    )
            if "ceiling" in args.only:
                log("starting the reference servers")
                servers["ceiling_asgi"] = stack.enter_context(
                    running(
                        lambda: processes.start(
                            "ceiling_asgi", ["-m", "bench.reference_asgi"], needs=("rest",)
                        )
                    )
                )
                servers["ceiling_rest"] = stack.enter_context(
                    running(
                        lambda: processes.start(
                            "ceiling_rest", ["-m", "bench.reference_rest"], needs=("rest",)
                        )
                    )
                )
                servers["ceiling_grpc"] = stack.enter_context(
                    running(
                        lambda: processes.start(
                            "ceiling_grpc", ["-m", "bench.reference_grpc"], needs=("grpc",), ready_path=None
                        )
                    )
                )
            for protocol in args.protocols:
                if protocol.endswith("_rest"):
                    order = [("ceiling_asgi", "asgi", "reference"), ("ceiling_rest", "ceiling", "reference")]
                else:
                    order = [("ceiling_grpc", "ceiling", "reference")]
                order.append(("ours", "ours", "ours"))
                order += [("nomon", "nomon", "compare"), ("split", "split", "compare")]
                order += [(tree_name, tree_name, "compare") for tree_name, _ in args.compare_tree]
                order += [(variant, variant, "compare") for variant, _ in args.variant]
                order += [(p.name, p.name, "peer") for p in peers.PEERS if protocol in p.protocols]
                for name, _, _ in order:
                    if name in servers:
                        preflight(servers[name], protocol, bodies[protocol], "digits")

                def profiled(name: str) -> bool:
                    return name in PROFILED or any(name == tree for tree, _ in args.compare_tree)

                for conns in args.connections:
                    # Side by side: each reference right next to the point it is compared with.
                    for name, prefix, group in order:
                        if name not in servers:
                            continue
                        log(f"{name}: {protocol} at {conns} connections")
                        result = measure(servers[name], protocol, bodies[protocol], "digits", conns, d, w)
                        prefixes = {
                            "ceiling_asgi": "bare ASGI no-op ",
                            "ceiling_rest": "FastAPI no-op ",
                            "ceiling_grpc": "grpc.aio no-op ",
                            "ours": "",
                        }
                        label = prefixes.get(name, f"{name}: ") + PROTOCOL_LABELS[protocol]
                        report.rows.append(
                            row_from(f"{prefix}.{protocol}.c{conns}", label, group, conns, result)
                        )
                        if args.profile and conns == max(args.connections) and profiled(name):
                            log(f"{name}: profiling {protocol} at {conns} connections")
                            budget = profile_point(
                                servers[name], protocol, bodies[protocol], conns, d,
                                args.out / "profiles", flame=args.flame,
                            )  # fmt: skip
                            report.budgets.append(budget.to_dict())
            if args.soak and "ours" in servers:
                soak(servers["ours"], bodies["tfserving_rest"], args, report)

    if "tutorial" in args.only:
        log("starting the tutorial baseline (FastAPI + keras model.predict)")
        with running(
            lambda: processes.start("tutorial", ["-m", "bench.tutorial_server", str(assets.digits_keras)],
                                    needs=("rest",))
        ) as tutorial:  # fmt: skip
            preflight(tutorial, "tfserving_rest", bodies["tfserving_rest"], "digits")
            conns = args.tutorial_connections
            td = min(d, args.tutorial_duration)
            log(f"tutorial: TF Serving REST body at {conns} connections for {td:g} s")
            result = measure(
                tutorial, "tfserving_rest", bodies["tfserving_rest"], "digits", conns, td, min(w, 2)
            )
            report.rows.append(
                row_from(f"tutorial.c{conns}", "tutorial: FastAPI + keras predict", "baseline", conns, result)
            )

    if "heavy" in args.only:
        heavy_suite(args, assets, bodies_dir, report, heavy_bodies, unbatched_bodies)


def heavy_suite(
    args: argparse.Namespace,
    assets: Assets,
    bodies_dir: Path,
    report: Report,
    heavy_bodies: dict[str, Path],
    unbatched_bodies: dict[str, Path],
) -> None:
    """The heavy model against its limit: in-process ORT at batch 32 and the one-row gRPC ceiling.

    Batched one-row requests with one and two workers, batching off, and requests of
    :data:`HEAVY_ROWS` rows (one full batch each) against in-process ORT at that batch.
    """
    d, w = args.duration, args.warmup
    providers = GPU_PROVIDERS if args.gpu else CPU_PROVIDERS
    heavy_repo = gpu_repo(assets.heavy_repo, bodies_dir / "heavy-gpu") if args.gpu else assets.heavy_repo
    log(f"in-process ONNX Runtime, heavy model, batch {HEAVY_ROWS}, {providers[0]}")
    r = inprocess(assets.heavy_onnx, HEAVY_ROWS, d, w, providers)
    report.rows.append(ort_row("ort.heavy.b32", f"in-process ORT heavy, batch {HEAVY_ROWS}", HEAVY_ROWS, r))
    rows = np.repeat(payloads.sample_row(payloads.HEAVY_FEATURES), HEAVY_ROWS, axis=0)
    many = bodies_dir / f"heavy-rows{HEAVY_ROWS}-tfserving_grpc.bin"
    many.write_bytes(payloads.grpc_frame(payloads.tfserving_predict("heavy", "pixels", rows)))
    log("starting the gRPC ceiling (heavy one-row body)")
    with running(
        lambda: processes.start(
            "ceiling_grpc", ["-m", "bench.reference_grpc"], needs=("grpc",), ready_path=None
        )
    ) as ceiling:
        preflight(ceiling, "tfserving_grpc", heavy_bodies["tfserving_grpc"], "heavy")
        log(f"grpc.aio no-op: heavy one-row Predict at {HEAVY_CONNECTIONS} connections")
        result = measure(
            ceiling, "tfserving_grpc", heavy_bodies["tfserving_grpc"], "heavy", HEAVY_CONNECTIONS, d, w
        )
        report.rows.append(
            row_from(
                f"ceiling.heavy_grpc.c{HEAVY_CONNECTIONS}",
                "grpc.aio no-op, heavy one-row Predict",
                "reference",
                HEAVY_CONNECTIONS,
                result,
            )
        )
    for workers in args.heavy_workers:
        suffix = "" if workers == 1 else f"_w{workers}"
        extra = [] if workers == 1 else ["--workers", str(workers)]
        log(f"starting modelloop serve (heavy, heavy_unbatched), {workers} worker(s)")
        with running(
            lambda extra=extra, suffix=suffix: processes.start(
                f"heavy{suffix}", [*serve_args(heavy_repo), *extra], env=state_env(f"heavy{suffix}")
            )
        ) as heavy:
            points = [
                ("heavy", f"heavy.batched{suffix}",
                 f"heavy, dynamic batching, {workers} worker(s) (gRPC Predict)",
                 heavy_bodies["tfserving_grpc"], HEAVY_CONNECTIONS, 1),
            ]  # fmt: skip
            if workers == 1:
                points += [
                    ("heavy_unbatched", "heavy.unbatched", "heavy, batching off (gRPC Predict)",
                     unbatched_bodies["tfserving_grpc"], HEAVY_CONNECTIONS, 1),
                    ("heavy", "heavy.rows32", f"heavy, {HEAVY_ROWS}-row requests (gRPC Predict)", many,
                     HEAVY_ROWS_CONNECTIONS, HEAVY_ROWS),
                ]  # fmt: skip
            for model, key, label, body, conns, per_request in points:
                preflight(heavy, "tfserving_grpc", body, model)
                log(f"{heavy.name}: {model} ({per_request} rows per request) at {conns} connections")
                result = measure(heavy, "tfserving_grpc", body, model, conns, d, w)
                report.rows.append(
                    row_from(f"{key}.c{conns}", label, "heavy", conns, result, rows=per_request)
                )


def tensorflow_loaded(pid: int) -> bool:
    """Whether TensorFlow's shared library is mapped into the process."""
    try:
        return "_pywrap_tensorflow" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def soak(proc: Proc, body: Path, args: argparse.Namespace, report: Report) -> None:
    """RSS after warm-up and after ``--soak-duration`` seconds at 32 connections."""
    log(f"soak: TF Serving REST at 32 connections for {args.soak_duration:g} s (RSS)")
    loadgen.run_wrk(proc.rest_url, rest_path("tfserving_rest", "digits"), body, connections=32, duration_s=5)
    start = proc.rss_bytes()
    result = loadgen.run_wrk(
        proc.rest_url,
        rest_path("tfserving_rest", "digits"),
        body,
        connections=32,
        duration_s=args.soak_duration,
    )
    end = proc.rss_bytes()
    report.rss = {
        **(report.rss or {}),
        "endpoint": "TF Serving REST :predict",
        "connections": 32,
        "duration_s": result.duration_s,
        "requests": result.requests,
        "start_bytes": start,
        "end_bytes": end,
        "growth": (end - start) / start if start else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the suite; prints the Markdown table and writes the JSON and PNG."""
    args = parse_args(argv)
    try:
        loadgen.check_tools()
    except loadgen.LoadToolMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    log("preparing models (cached in bench/.cache after the first run)")
    assets = ensure_assets(args.cache) if args.cache else ensure_assets()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report = Report(
        timestamp=stamp,
        command="python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        machine=machine_info(),
        settings={
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "heavy_connections": HEAVY_CONNECTIONS,
            "heavy_batching": HEAVY_BATCHING,
            "heavy_rows_per_request": HEAVY_ROWS,
            "heavy_workers": args.heavy_workers,
            "tutorial_connections": args.tutorial_connections,
            "rows_per_request": 1,
            "heavy_providers": GPU_PROVIDERS if args.gpu else CPU_PROVIDERS,
        },
    )
    with tempfile.TemporaryDirectory(prefix="modelloop-bench-") as tmp:
        run_suite(args, assets, Path(tmp), report)
    if report.rss is not None and "end_bytes" not in report.rss:
        report.rss = None
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{stamp}.json", args.out / f"{stamp}.png"
    write_json(report, json_path)
    write_chart(report, png_path)
    write_markdown(report, args.markdown)
    print(render_markdown(report))
    log(f"wrote {json_path}, {png_path} and {args.markdown} in {time.monotonic() - started:.0f} s")
    return 0
