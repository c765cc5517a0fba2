"""The control plane's own figures: how fast it reads the prediction log, and how late.

Two points, each on the default store (SQLite in a temporary directory) with digits-shaped
records (64 inputs, 10 probabilities, one row per request, as a client sending single
images makes them), the reader pinned to one CPU (``BENCH_SERVER_CPUS``, default 0):

- **throughput**: ``--requests`` logged predictions are written to the log first, then one
  :class:`LogIngest` reads them all (decode, the predictions table for the label join, the
  history's traffic counts, the drift windows). Predictions per second of wall time and of
  the reader's CPU time. Target: 20,000 per second on one core.
- **lag**: a writer appends a segment every 0.25 s (what a server's logger does) at
  ``--rate`` predictions per second, for ``--lag-duration`` seconds, while the reader runs
  as the control plane runs it (its thread, its interval). For each prediction, the time
  from its answer to its arrival in the drift window. Target: p99 within 5 s at 5,000/s.
- **no drop** (``--no-drop SECONDS``, 180 for the issue's figure): ``modelloop serve`` with
  its defaults (the SQLite store) on the server CPU and ``modelloop monitor`` on the load
  CPU, wrk at 32 connections on the load CPU for that long, then the server's
  ``modelloop_monitoring_dropped_total`` and the predictions the control plane stored
  against the requests the server answered. Target: nothing dropped, every answer stored.

Run: ``python -m bench.control_plane`` (about a minute; ``--no-drop 180`` adds four);
``--json FILE`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from bench import loadgen, payloads, processes
from bench.models import ensure_digits
from bench.suite import start_control_plane
from modelloop.logformat import LogColumns, encode_batch, encode_segment
from modelloop.monitoring.history import LoggedTraffic
from modelloop.monitoring.ingest import LogIngest
from modelloop.monitoring.metrics import MonitoringMetrics
from modelloop.monitoring.predlog_store import SqlPredictionLog
from modelloop.monitoring.recorder import LogRecorder, VersionInfo
from modelloop.monitoring.stores import open_stores
from modelloop.monitoring.window import WindowSet

FEATURES = 64
CLASSES = 10
# What a server's logger writes per flush (serving/predlog.py: one segment every 0.25 s).
FLUSH_S = 0.25
THROUGHPUT_TARGET = 20_000.0
LAG_TARGET_S = 5.0
LAG_RATE = 5_000.0


@dataclass(frozen=True)
class ControlPlaneFigures:
    """One run's figures."""

    predictions: int
    wall_s: float
    cpu_s: float
    per_s_wall: float
    per_s_cpu: float
    lag_rate: float
    lag_predictions: int
    lag_p50_s: float
    lag_p99_s: float
    lag_max_s: float
    no_drop_s: float = 0.0
    answered: int = 0
    stored: int = 0
    dropped: float = 0.0
    no_drop_rps: float = 0.0


def _segment(rng: np.random.Generator, first_id: int, n: int, t: float) -> bytes:
    pixels = rng.integers(0, 17, size=(n, FEATURES)).astype(np.float32)
    logits = rng.normal(size=(n, CLASSES)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    items = [
        (
            "digits",
            1,
            f"r{first_id + i}",
            t,
            0.002,
            {"pixels": pixels[i : i + 1]},
            {"probabilities": probs[i : i + 1]},
        )
        for i in range(n)
    ]
    batch = encode_batch(items, LogColumns("pixels", "probabilities"))
    assert batch is not None
    return encode_segment([batch])


class _Reader:
    """A control plane's reading side over one store: the log, the recorder, the windows."""

    def __init__(self, url: str, *, window: int) -> None:
        self.stores = open_stores(url)
        self.log = SqlPredictionLog(self.stores.engine, settle_s=0.0)
        self.metrics = MonitoringMetrics(CollectorRegistry())
        self.windows = WindowSet(window)
        self.recorder = LogRecorder(
            self.stores.predictions, self.windows, lambda m, v: VersionInfo("multiclass", CLASSES)
        )
        self.traffic = LoggedTraffic()
        self.ingest = LogIngest(self.log, self.recorder, self.metrics, traffic=self.traffic, prune=False)

    def close(self) -> None:
        self.ingest.stop()
        self.stores.close()


def measure_throughput(directory: Path, requests: int, per_segment: int) -> tuple[int, float, float]:
    """Writes ``requests`` predictions, then times one reader storing them all.

    Returns:
        ``(predictions stored, wall seconds, reader CPU seconds)``.
    """
    reader = _Reader(f"sqlite:///{directory / 'throughput.db'}", window=5000)
    try:
        rng = np.random.default_rng(0)
        now = time.time()
        for first in range(0, requests, per_segment):
            n = min(per_segment, requests - first)
            reader.log.append(_segment(rng, first, n, now), rows=n)
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        while reader.ingest.step():
            pass
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        return reader.ingest.stored, wall, cpu
    finally:
        reader.close()


def measure_lag(directory: Path, rate: float, duration: float) -> np.ndarray:
    """Writes at ``rate`` predictions per second while the reader runs; each prediction's lag.

    Returns:
        Seconds from each prediction's answer to its rows entering the drift window.
    """
    reader = _Reader(f"sqlite:///{directory / 'lag.db'}", window=5000)
    lags: list[np.ndarray] = []
    write = reader.recorder.write

    def timed_write(batch: list[Any]) -> int:
        stored = write(batch)
        arrived = time.time()
        lags.append(arrived - np.array([item[3] for item in batch]))
        return stored

    reader.recorder.write = timed_write  # type: ignore[method-assign]
    stop = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(1)
        written, start = 0, time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            n = due - written
            if n > 0:
                # The segment's predictions were answered over the last flush interval.
                reader.log.append(_segment(rng, written, n, time.time() - FLUSH_S / 2), rows=n)
                written = due
            stop.wait(FLUSH_S)

    thread = threading.Thread(target=writer, name="bench-log-writer", daemon=True)
    try:
        reader.ingest.start()
        thread.start()
        time.sleep(duration)
        stop.set()
        thread.join()
        reader.ingest.catch_up(timeout=30)
    finally:
        stop.set()
        reader.close()
    return np.concatenate(lags) if lags else np.zeros(0)


def _metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of one metric's samples in a Prometheus text page, over those with ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ " and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure_no_drop(directory: Path, seconds: float) -> tuple[int, int, float, float]:
    """A default server at full speed for ``seconds``; what it answered, stored and dropped.

    Returns:
        ``(answered, stored, dropped, requests per second)``.
    """
    import httpx

    _, repo = ensure_digits()
    state = directory / "no-drop-state"
    env = {"MODELLOOP_MONITORING_STATE_DIR": str(state), "MODELLOOP_MONITORING_TRIGGER": "none"}
    argv = ["-m", "modelloop", "serve", "--repo", str(repo), "--rest-port", "0", "--grpc-port", "0"]
    body = payloads.write_bodies(directory, "digits", "pixels", payloads.sample_row(payloads.DIGITS_FEATURES))
    plane = start_control_plane(repo, env)
    argv += ["--control-plane", plane.rest_url]
    try:
        proc = processes.start("no-drop", argv, env=env)
    except BaseException:
        plane.stop()
        raise
    try:
        path = "/v1/models/digits:predict"
        result = loadgen.run_wrk(
            proc.rest_url, path, body["tfserving_rest"], connections=32, duration_s=seconds
        )
        page = httpx.get(f"{proc.rest_url}/metrics", timeout=10).text
        answered = int(_metric_sum(page, "modelloop_requests_total", code="OK", model="digits"))
        dropped = _metric_sum(page, "modelloop_monitoring_dropped_total")
        # The control plane stores what the server's logger wrote; wait until it has all of it.
        db = next(state.rglob("*.db"))
        deadline = time.monotonic() + 120
        stored = 0
        while time.monotonic() < deadline:
            with sqlite3.connect(db, timeout=30) as conn:
                stored = int(
                    conn.execute("SELECT count(*) FROM predictions WHERE model = 'digits'").fetchone()[0]
                )
            if stored >= answered:
                break
            time.sleep(1)
        return answered, stored, dropped, result.requests / result.duration_s if result.duration_s else 0.0
    finally:
        proc.stop()
        plane.stop()


def run(
    requests: int, per_segment: int, rate: float, lag_duration: float, no_drop: float = 0.0
) -> ControlPlaneFigures:
    """The points, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="modelloop-bench-cp-") as tmp:
        stored, wall, cpu = measure_throughput(Path(tmp), requests, per_segment)
        lags = measure_lag(Path(tmp), rate, lag_duration)
        soak = measure_no_drop(Path(tmp), no_drop) if no_drop > 0 else (0, 0, 0.0, 0.0)
    return ControlPlaneFigures(
        predictions=stored,
        wall_s=wall,
        cpu_s=cpu,
        per_s_wall=stored / wall if wall else 0.0,
        per_s_cpu=stored / cpu if cpu else 0.0,
        lag_rate=rate,
        lag_predictions=int(lags.size),
        lag_p50_s=float(np.percentile(lags, 50)) if lags.size else float("nan"),
        lag_p99_s=float(np.percentile(lags, 99)) if lags.size else float("nan"),
        lag_max_s=float(lags.max()) if lags.size else float("nan"),
        no_drop_s=no_drop,
        answered=soak[0],
        stored=soak[1],
        dropped=soak[2],
        no_drop_rps=soak[3],
    )


def render(f: ControlPlaneFigures) -> str:
    """The figures and the two targets with verdicts, as Markdown."""
    ok = "met" if f.per_s_wall >= THROUGHPUT_TARGET else "NOT met"
    lag_ok = "met" if f.lag_p99_s <= LAG_TARGET_S else "NOT met"
    soak: list[str] = []
    if f.no_drop_s:
        kept = "met" if f.dropped == 0 and f.stored >= f.answered else "NOT met"
        soak = [
            f"| {f.no_drop_s:g} s at 32 connections ({f.no_drop_rps:,.0f} req/s): dropped; stored/answered "
            f"| {f.dropped:,.0f}; {f.stored:,} of {f.answered:,} | 0; all | {kept} |"
        ]
    return "\n".join(
        [
            "| control plane (one core, SQLite) | value | target | verdict |",
            "|---|--:|--:|---|",
            f"| logged predictions stored per s (wall; {f.predictions:,} read) | {f.per_s_wall:,.0f} "
            f"| ≥ {THROUGHPUT_TARGET:,.0f} | {ok} |",
            f"| the same per s of the reader's CPU | {f.per_s_cpu:,.0f} | | |",
            f"| lag to the drift window at {f.lag_rate:,.0f}/s, p99 (p50, max) | {f.lag_p99_s:.2f} s "
            f"({f.lag_p50_s:.2f}, {f.lag_max_s:.2f}) | ≤ {LAG_TARGET_S:.0f} s | {lag_ok} |",
            *soak,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.control_plane", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=200_000, help="predictions of the throughput point")
    parser.add_argument(
        "--per-segment",
        type=int,
        default=1_250,
        help="predictions per segment (5,000/s flushed every 0.25 s)",
    )
    parser.add_argument(
        "--rate", type=float, default=LAG_RATE, help="predictions per second of the lag point"
    )
    parser.add_argument("--lag-duration", type=float, default=30.0, help="seconds of the lag point")
    parser.add_argument(
        "--no-drop", type=float, default=0.0, help="seconds of a default server at full speed (0: skip)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    cpus = os.environ.get("BENCH_SERVER_CPUS", "0")
    try:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    except (ValueError, OSError) as exc:
        print(f"cannot pin to CPU {cpus} ({exc}); running unpinned", file=sys.stderr)
    figures = run(args.requests, args.per_segment, args.rate, args.lag_duration, args.no_drop)
    print(render(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
