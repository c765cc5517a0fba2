"""The latency guardrail on a noisy host: the good candidate is promoted, the slow one rolled back.

Runs the rollout end-to-end test's good-candidate walk and its slow-candidate rollback
(``tests/e2e/test_rollout_e2e.py``: a real server, labelled traffic, the default
``max_latency_ratio`` of 3) ``--runs`` times, each run with a CPU hog (a busy loop, one
process per CPU in ``--hog-cpus``, default CPU 1: the other core of a two-core machine)
running from before the server starts until the run ends. Prints how many runs of each
test passed.

Run: ``python -m bench.rollout_noise --runs 20`` (about a minute per run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {
    "good candidate promoted": "tests/e2e/test_rollout_e2e.py::test_good_candidate_walks_to_champion",
    "slow candidate rolled back": "tests/e2e/test_rollout_e2e.py::test_bad_candidate_rolled_back[slow]",
}


def _hog(cpu: int) -> subprocess.Popen[bytes]:
    """A busy loop pinned to one CPU."""
    return subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])


def run_once(hog_cpus: list[int], junit: Path) -> dict[str, str]:
    """One pytest run of both tests under the hog; "" for each test that passed, else why not."""
    hogs = [_hog(cpu) for cpu in hog_cpus]
    try:
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
             f"--junitxml={junit}", *TESTS.values()],
            cwd=ROOT,
            capture_output=True,
            timeout=900,
            check=False,
        )  # fmt: skip
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    outcome: dict[str, str] = dict.fromkeys(TESTS, "did not run")
    if not junit.is_file():
        return outcome
    for case in ET.parse(junit).getroot().iter("testcase"):
        node = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        for name, test in TESTS.items():
            if node == test:
                bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
                message = (bad[0].get("message") or bad[0].tag) if bad else ""
                # A rollout's state names its reason: show that rather than the state's start.
                at = message.find("'reason': ")
                outcome[name] = (message[at:] if at >= 0 else message)[:400]
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rollout_noise", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hog-cpus", default="1", help="CPUs to keep busy, comma-separated (default 1)")
    args = parser.parse_args(argv)
    cpus = [int(c) for c in args.hog_cpus.split(",") if c.strip()]
    counts = dict.fromkeys(TESTS, 0)
    with tempfile.TemporaryDirectory(prefix="modelloop-rollout-noise-") as tmp:
        for i in range(args.runs):
            started = time.monotonic()
            outcome = run_once(cpus, Path(tmp) / f"run-{i}.xml")
            for name, why in outcome.items():
                counts[name] += not why
            verdicts = ", ".join(
                f"{name}: {'FAIL (' + why + ')' if why else 'pass'}" for name, why in outcome.items()
            )
            print(f"run {i + 1}/{args.runs} ({time.monotonic() - started:.0f} s): {verdicts}", flush=True)
    for name, n in counts.items():
        print(f"{name}: {n} of {args.runs} runs (CPU hog on CPU {args.hog_cpus}, {os.cpu_count()} CPUs)")
    return 0 if all(n == args.runs for n in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
