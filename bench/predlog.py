"""The prediction logger's own CPU per logged prediction, in process (a bench point).

The same answered digits requests (one row of 64 float32 pixels, ten probabilities) go
``requests`` times to an observer: once to a null observer, once to a
:class:`~modelloop.serving.predlog.PredictionLogger` whose writer thread encodes the
segments and appends them to a sink (by default the SQL log on a SQLite file, as a server
without a store URL writes it; ``objects`` writes segment files, ``null`` keeps only the
encoding). The calls come in runs of ``segment`` requests, each followed by a flush: a
segment of 1200 requests is what a server answering 4,800 requests a second (the issue's
measured rate) writes every 0.25 s. The CPU time of the whole process
(``time.process_time``: the calls, the writer thread and the sink) over the calls and the
flushes, logging on minus logging off, divided by the requests, is the logger's cost per
logged prediction; each figure is the best of a few rounds. The issue's target is 5 µs.

Run ``python -m bench.predlog [--requests N] [--segment N] [--sink sql|objects|null]``;
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.serving.predlog import LogColumns, PredictionLogger, PredictionLogSink
from modelloop.serving.types import InferRequest, InferResponse, Protocol

ROUNDS = 5


class NullSink:
    """Takes every segment and keeps nothing."""

    def append(self, segment: bytes, *, rows: int) -> None:
        """Discards the segment."""


def _requests(count: int) -> list[tuple[InferRequest, InferResponse]]:
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(count):
        rid = f"req-{i:08d}"
        x = rng.integers(0, 17, size=(1, 64)).astype(np.float32)
        y = rng.random((1, 10), dtype=np.float32)
        pairs.append(
            (
                InferRequest("digits", {"pixels": x}, Protocol.TFSERVING_REST, id=rid),
                InferResponse("digits", 1, {"probabilities": y}, id=rid, seconds=0.0004),
            )
        )
    return pairs


def _open_sink(kind: str, tmp: Path) -> tuple[PredictionLogSink, Any]:
    if kind == "null":
        return NullSink(), None
    if kind == "objects":
        from modelloop.monitoring.predlog_objects import ObjectPredictionLog

        log = ObjectPredictionLog(f"file://{tmp / 'log'}")
        return log, None
    from modelloop.monitoring.predlog_store import SqlPredictionLog
    from modelloop.monitoring.stores import open_stores

    stores = open_stores(f"sqlite:///{tmp / 'log.db'}")
    return SqlPredictionLog(stores.engine), stores


def _cpu_of(observe: Any, pairs: list[tuple[InferRequest, InferResponse]], segment: int, flush: Any) -> float:
    start = time.process_time()
    for first in range(0, len(pairs), segment):
        for request, response in pairs[first : first + segment]:
            observe(request, response)
        flush()
    return time.process_time() - start


def measure(requests: int, sink: str = "sql", segment: int = 1200) -> dict[str, Any]:
    """Logging on against a null observer over the same requests; the best of a few rounds each.

    Args:
        requests: Requests per round.
        sink: ``sql`` (SQLite file), ``objects`` (segment files) or ``null``.
        segment: Requests between two flushes. Defaults to 1200.

    Returns:
        CPU µs per prediction with and without logging, their difference, and the segments written.
    """
    pairs = _requests(requests)
    off: list[float] = []
    on: list[float] = []
    with tempfile.TemporaryDirectory(prefix="modelloop-predlog-bench-") as tmp:
        target, store = _open_sink(sink, Path(tmp))
        logger = PredictionLogger(
            target,
            columns=lambda model, version: LogColumns("pixels", "probabilities"),
            sample=lambda model: 1.0,
            queue_size=max(100_000, requests),
        )
        logger.start()
        try:
            for _ in range(ROUNDS):
                off.append(_cpu_of(lambda request, response: None, pairs, segment, lambda: None))
                on.append(_cpu_of(logger.observe, pairs, segment, lambda: logger.flush(timeout=60)))
        finally:
            logger.stop()
            if store is not None:
                store.close()
    best_on, best_off = min(on), min(off)
    return {
        "point": f"prediction logger, in process ({sink} sink), digits 1 row per request",
        "requests": requests,
        "segment": segment,
        "rounds": ROUNDS,
        "on_us_per_prediction": 1e6 * best_on / requests,
        "off_us_per_prediction": 1e6 * best_off / requests,
        "logger_us_per_prediction": 1e6 * (best_on - best_off) / requests,
        "segments": logger.segments,
        "dropped": logger.dropped,
        "target_us": 5.0,
    }


def main(argv: list[str] | None = None) -> int:
    """Measures and prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.predlog", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="requests per round (default 50000)")
    parser.add_argument("--segment", type=int, default=1200, help="requests per flush (default 1200)")
    parser.add_argument("--sink", choices=("sql", "objects", "null"), default="sql")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.requests, args.sink, args.segment)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
