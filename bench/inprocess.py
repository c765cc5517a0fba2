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
    model: str, batch: int, duration_s: float, warmup_s: float, providers: list[str] | None = None
) -> dict[str, float | str]:
    """Calls ``session.run`` on one fixed batch for ``duration_s`` and returns rows/s and latencies.

    The session is built as the server builds it (default options); ``providers``
    defaults to the CPU provider. The result names the provider really used.
    """
    import onnxruntime as ort

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
    args = parser.parse_args()
    print(
        json.dumps(measure(args.model, args.batch, args.duration, args.warmup, args.providers.split(","))),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
