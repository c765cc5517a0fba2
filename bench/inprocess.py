"""In-process ONNX Runtime throughput: the model with no server around it.

Run as ``python -m bench.inprocess MODEL.onnx --batch 32 --duration 10`` (pinned to the
server CPU by the suite); prints one JSON line with rows/s and per-call latencies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def measure(
    model: str,
    batch: int,
    duration_s: float,
    warmup_s: float,
    providers: list[str] | None = None,
    server_options: bool = True,
) -> dict[str, float | str]:
    """Calls ``session.run`` on one fixed batch for ``duration_s`` and returns rows/s and latencies.

    With ``server_options`` the session is built as the server builds it: intra-op threads
    sized to this process's CPUs, no spinning (so the reference uses the CPUs the server
    may use, not threads pinned elsewhere). Otherwise ONNX Runtime's defaults. ``providers``
    defaults to the CPU provider. The result names the provider really used.
    """
    import onnxruntime as ort

    from modelloop.serving.cpus import cpu_budget
    from modelloop.serving.runtimes.onnx import session_options

    if server_options:
        options = session_options(cpu_budget().count)
    else:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    session = ort.InferenceSession(
        model, sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )
    inp = session.get_inputs()[0]
    features = int(inp.shape[1])
    rng = np.random.default_rng(0)
    feed = {inp.name: rng.integers(0, 17, size=(batch, features)).astype(np.float32)}
    names = [o.name for o in session.get_outputs()]
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        session.run(names, feed)
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + duration_s
    now = start
    while now < end:
        t0 = now
        session.run(names, feed)
        now = time.perf_counter()
        latencies.append(now - t0)
    elapsed = now - start
    latencies.sort()
    return {
        "provider": session.get_providers()[0],
        "intra_op_num_threads": session.get_session_options().intra_op_num_threads,
        "calls": len(latencies),
        "duration_s": elapsed,
        "rows_per_s": len(latencies) * batch / elapsed,
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def main() -> int:
    """Parses arguments and prints the measurement as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated, in order")
    parser.add_argument(
        "--server-options", action="store_true", help="the server's session options (threads, no spinning)"
    )
    args = parser.parse_args()
    result = measure(
        args.model, args.batch, args.duration, args.warmup, args.providers.split(","), args.server_options
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
