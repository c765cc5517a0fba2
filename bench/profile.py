"""The per-request budget: where a server's CPU time goes, in µs per request and per stage.

A sampling profiler (py-spy, pinned in the dev extras) records the server under load from
the load CPU while the load generator runs; each sampled stack is put in one stage by its
innermost frame that a rule of :data:`STAGES` knows, and a stage's share of the samples
times the server's measured CPU per request is its µs per request. Frames that no rule
knows are the front end's own work (uvicorn, httptools, grpc's C core under the event
loop, asyncio): the ``edge`` stage.

Usage (what ``python -m bench --profile`` runs for each point)::

    py-spy record --pid PID --rate 250 --duration 8 --nonblocking --format raw -o stacks.txt
    py-spy record --pid PID --rate 250 --duration 8 --nonblocking -o flame.svg   # a flame graph

The figures are samples, not timers: about ±10 % of a stage on an 8 s run, and on a
shared machine a stage below 5 µs is noise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

STAGES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (stage, re.compile(pattern))
    for stage, pattern in (
        # Background threads first: their frames say what they are wherever the leaf is.
        ("monitoring (threads)", r"\((monitoring/|sqlalchemy/)"),
        ("log", r"^(PredictionLogger\.|NullObserver\.)|\(serving/predlog\.py"),
        ("run", r"^(OnnxRuntime\.predict|SavedModelRuntime\.|PythonRuntime\.|Session\.run)"),
        ("metrics", r"\((serving/metrics\.py|serving/statistics\.py|prometheus_client/)"),
        (
            "encode",
            r"^(encode_|[A-Za-z]*Decoder\.encode|_encode|JsonResponse\.__init__)",
        ),
        (
            "parse",
            r"^(decode_|[A-Za-z]*Decoder\.decode|[A-Za-z]*Decoder\.precheck|check_value_count|_decode)",
        ),
        (
            "validate",
            r"^(validate_inputs|cast_input|check_finite|choose_request_id|new_request_id|"
            r"RequestIdSource\.|wanted_outputs|valid_request_id)",
        ),
        (
            "resolve",
            r"^(ModelRegistry\.|BoundedMemory\.|ModelEntry\.|[A-Za-z]*Decoder\.target|parse_version|split_method|match_route|"
            r"request_id_of|DataPlane\._model_label|model_spec_target)",
        ),
        ("batch hand-off", r"^(DynamicBatcher\.|Servable\.use|_rows|answer \(|settle \(|check_rows)"),
        (
            "read",
            r"^([A-Za-z]*Decoder\.read|read_body|check_content_type|Request\.(body|stream)|"
            r"RequestResponseCycle\.receive|HttpToolsProtocol\.(data_received|on_|_parse)|"
            r"H11Protocol\.(data_received|handle_events))",
        ),
        (
            "write",
            r"^(Response\.__call__|JsonResponse\.__call__|RequestResponseCycle\.send|"
            r"_SelectorSocketTransport\.write|set_trailing_metadata|_id_metadata)",
        ),
        ("data plane (other)", r"^DataPlane\.handle|\(serving/dataplane\.py"),
        (
            "edge (ours)",
            r"^(PredictFastPath\.|answer_predict|answer_infer|translate_errors|"
            r"[A-Za-z]*Servicer\.|OriginGuard\.|RestApp\.|traced_)",
        ),
    )
)
"""(stage, rule) in the order a stack's frames are tried: the innermost frame a rule matches
decides, and the background-thread rules win over the rest (a frame under monitoring is
monitoring's, whatever it calls)."""
EDGE = "edge (server framework)"
ORDER = (
    "read",
    "parse",
    "resolve",
    "validate",
    "batch hand-off",
    "run",
    "encode",
    "metrics",
    "log",
    "write",
    "data plane (other)",
    "edge (ours)",
    EDGE,
    "monitoring (threads)",
)
IDLE = re.compile(
    r"^(Condition\.wait|Event\.wait|Thread\.run|_worker|Queue\.get|SimpleQueue\.get|select|"
    r"BaseSelector\.select|EpollSelector\.select|sleep) "
)
"""Leaves that only wait (a thread blocked in C that py-spy's idle check missed): left out."""
_FRAME = re.compile(r"^(?P<name>.*) \((?P<where>[^()]*)\)$")


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's ``--format raw`` output (collapsed stacks, root first) as stack -> samples."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _short(frame: str) -> str:
    """``name (path:line)`` with the path cut to what the rules look at (site-packages off)."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    where = match.group("where")
    for marker in ("site-packages/", "modelloop/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{match.group('name')} ({where})"


def classify(stack: Iterable[str]) -> str:
    """The stage of one sampled stack (root first)."""
    frames = [_short(f) for f in stack]
    for stage, rule in STAGES[:1]:
        if any(rule.search(f) for f in frames):
            return stage
    for frame in reversed(frames):
        for stage, rule in STAGES[1:]:
            if rule.search(frame):
                return stage
    return EDGE


@dataclass
class Budget:
    """The per-request budget of one point: µs per request of each stage.

    Attributes:
        point: What was measured (server and endpoint).
        cpu_us: The server's CPU µs per request over the profiled run (from ``/proc``).
        samples: Samples per stage.
    """

    point: str
    cpu_us: float
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        """Every sample of the run."""
        return sum(self.samples.values())

    def stage_us(self, stage: str) -> float:
        """The stage's µs per request: its share of the samples times the CPU per request."""
        total = self.total_samples
        return self.cpu_us * self.samples.get(stage, 0) / total if total else 0.0

    def to_dict(self) -> dict[str, object]:
        """The budget as a JSON-ready dict."""
        return {
            "point": self.point,
            "cpu_us": self.cpu_us,
            "samples": dict(self.samples),
            "stage_us": {stage: self.stage_us(stage) for stage in ORDER},
        }


def budget_from_stacks(point: str, stacks: Counter[tuple[str, ...]], cpu_us: float) -> Budget:
    """Sorts the samples into stages."""
    samples: Counter[str] = Counter()
    for stack, count in stacks.items():
        if stack and IDLE.match(_short(stack[-1])):
            continue
        samples[classify(stack)] += count
    return Budget(point, cpu_us, {stage: samples.get(stage, 0) for stage in ORDER})


def render_budgets(budgets: list[Budget]) -> str:
    """One Markdown table: a column per point, a row per stage, µs per request."""
    if not budgets:
        return ""
    lines = [
        "| stage (µs per request) | " + " | ".join(b.point for b in budgets) + " |",
        "|---|" + "--:|" * len(budgets),
    ]
    for stage in ORDER:
        lines.append(f"| {stage} | " + " | ".join(f"{b.stage_us(stage):.0f}" for b in budgets) + " |")
    lines.append("| **CPU per request** | " + " | ".join(f"**{b.cpu_us:.0f}**" for b in budgets) + " |")
    lines.append("| samples | " + " | ".join(str(b.total_samples) for b in budgets) + " |")
    return "\n".join(lines)


class ProfilerMissing(RuntimeError):
    """py-spy is not installed (``pip install -e '.[dev]'``)."""


def py_spy() -> str:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfilerMissing("py-spy is missing: pip install -e '.[dev]' (it is pinned there)")
    return found


def record(
    pid: int,
    duration_s: float,
    out: Path,
    load: Callable[[], object],
    *,
    cpu: str,
    rate: int = 250,
    flame: bool = False,
) -> Counter[tuple[str, ...]]:
    """Samples ``pid`` with py-spy on ``cpu`` while ``load()`` runs; returns the stacks.

    Args:
        pid: The server process.
        duration_s: Seconds to sample (start ``load`` for at least as long).
        out: Where the raw stacks go (``.txt``); with ``flame``, an ``.svg`` beside it.
        load: Runs the load generator (blocking) for the profiled run.
        cpu: ``taskset -c`` CPUs of the profiler (the load CPU: never the server's).
        rate: Samples per second. Defaults to 250.
        flame: Also write a flame graph (a second py-spy run over the same load). Defaults
            to False.
    """
    argv = [
        "taskset", "-c", cpu, py_spy(), "record", "--pid", str(pid), "--rate", str(rate),
        "--duration", str(max(1, round(duration_s))), "--nonblocking",
    ]  # fmt: skip
    runs = [(out, [*argv, "--format", "raw", "-o", str(out)])]
    if flame:
        runs.append((out.with_suffix(".svg"), [*argv, "-o", str(out.with_suffix(".svg"))]))
    stacks: Counter[tuple[str, ...]] = Counter()
    for path, cmd in runs:
        done: list[subprocess.CompletedProcess[str]] = []

        def sample(cmd: list[str] = cmd, done: list[subprocess.CompletedProcess[str]] = done) -> None:
            done.append(subprocess.run(cmd, capture_output=True, text=True, timeout=300))

        thread = threading.Thread(target=sample)
        thread.start()
        load()
        thread.join()
        if not done or done[0].returncode != 0:
            raise RuntimeError(f"py-spy failed: {done[0].stderr if done else 'no result'}")
        if path.suffix == ".txt":
            stacks = parse_raw(path.read_text(errors="replace"))
    return stacks


def top_frames(stacks: Counter[tuple[str, ...]], n: int = 25) -> list[tuple[str, float]]:
    """The functions with the most samples on the stack (inclusive), as shares of all samples."""
    total = sum(stacks.values()) or 1
    inclusive: Counter[str] = Counter()
    for stack, count in stacks.items():
        for frame in {_short(f) for f in stack}:
            inclusive[frame] += count
    return [(frame, count / total) for frame, count in inclusive.most_common(n)]
