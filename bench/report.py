"""Results: the JSON document, the Markdown table, the target ratios and the chart.

Every ratio compares rows of one run: numbers from different runs (or machines) are
never mixed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "modelloop-bench/1"


@dataclass
class Row:
    """One measured point.

    ``throughput`` is requests/s for servers and rows/s for in-process runs (``unit``).
    """

    key: str
    label: str
    group: str
    connections: int | None
    throughput: float
    unit: str = "req/s"
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    requests: int = 0
    duration_s: float = 0.0
    rows_per_request: int = 1
    note: str = ""
    cpu_us: float | None = None
    """Server CPU time (process and children, from /proc) per request, in microseconds."""

    @property
    def rows_per_s(self) -> float:
        """Rows per second (requests/s x rows per request for servers)."""
        return self.throughput if self.unit == "rows/s" else self.throughput * self.rows_per_request


@dataclass(frozen=True)
class Target:
    """A ratio between rows of one run (or one absolute figure), with the bound the issue sets.

    ``denominator`` names one row, or several whose smallest value is the reference (the
    heavy model's limit is the lower of two figures); an empty ``denominator`` makes the
    value absolute: ``metric`` read from ``Report.startup`` (``ready_s``, ``rss_mib``).
    """

    name: str
    numerator: str
    denominator: str | tuple[str, ...] = ""
    minimum: float | None = None
    maximum: float | None = None
    metric: str = "rows_per_s"  # or "p50_ms", "p99_ms", "cpu_us", "ready_s", "rss_mib"
    difference: bool = False
    """The value is numerator - denominator (the logger's own CPU), not their ratio."""
    best: bool = False
    """Of several denominators, the reference is the largest (the best peer), not the smallest."""


_REST32, _ASGI32 = "ours.tfserving_rest.c32", "asgi.tfserving_rest.c32"
HEAVY_LIMIT = ("ort.heavy.b32", "ceiling.heavy_grpc.c64")
"""The heavy model's limit: in-process rows/s at batch 32, or the transport's one-row ceiling."""

TARGETS: tuple[Target, ...] = (
    Target("TF Serving REST :predict / bare ASGI no-op (32 conn)", _REST32, _ASGI32, 0.35),
    Target("OIP V2 REST infer / bare ASGI no-op (32 conn)", "ours.v2_rest.c32", "asgi.v2_rest.c32", 0.3),
    Target(
        "TF Serving gRPC Predict / grpc.aio no-op (32 conn)",
        "ours.tfserving_grpc.c32",
        "ceiling.tfserving_grpc.c32",
        0.65,
    ),
    Target("OIP gRPC ModelInfer / grpc.aio no-op (32 conn)", "ours.v2_grpc.c32", "ceiling.v2_grpc.c32", 0.65),
    Target(
        "TF Serving gRPC Predict CPU per request / grpc.aio no-op's (32 conn)",
        "ours.tfserving_grpc.c32",
        "ceiling.tfserving_grpc.c32",
        maximum=1.5,
        metric="cpu_us",
    ),
    Target(
        "OIP gRPC ModelInfer CPU per request / grpc.aio no-op's (32 conn)",
        "ours.v2_grpc.c32",
        "ceiling.v2_grpc.c32",
        maximum=1.5,
        metric="cpu_us",
    ),
    Target(
        "TF Serving REST p50 / bare ASGI p50 (1 conn)",
        "ours.tfserving_rest.c1",
        "asgi.tfserving_rest.c1",
        maximum=3.0,
        metric="p50_ms",
    ),
    Target(
        "TF Serving REST CPU per request / bare ASGI's (32 conn)",
        _REST32,
        _ASGI32,
        maximum=3.0,
        metric="cpu_us",
    ),
    Target(
        "monitoring on (log to a control plane) / --no-monitoring, CPU per TF Serving REST request",
        "split.tfserving_rest.c32",
        "nomon.tfserving_rest.c32",
        maximum=1.10,
        metric="cpu_us",
    ),
    Target(
        "monitoring on (log to a control plane) / --no-monitoring, CPU per OIP gRPC ModelInfer",
        "split.v2_grpc.c32",
        "nomon.v2_grpc.c32",
        maximum=1.10,
        metric="cpu_us",
    ),
    Target(
        "the logger's serving CPU per logged prediction (µs, REST, one row per request)",
        "split.tfserving_rest.c32",
        "nomon.tfserving_rest.c32",
        maximum=5.0,
        metric="cpu_us",
        difference=True,
    ),
    Target(
        "TF Serving REST :predict / KServe V1 (32 conn, --peers)", _REST32, "kserve.tfserving_rest.c32", 3.0
    ),
    Target(
        "OIP V2 REST infer / the best V2 REST peer (32 conn, --peers)",
        "ours.v2_rest.c32",
        ("kserve.v2_rest.c32", "mlserver.v2_rest.c32"),
        3.0,
        best=True,
    ),
    Target(
        "OIP gRPC ModelInfer / KServe gRPC (32 conn, --peers)", "ours.v2_grpc.c32", "kserve.v2_grpc.c32", 1.9
    ),
    Target("ONNX server RSS after load (MiB)", "ours", maximum=300.0, metric="rss_mib"),
    Target("ONNX server ready after launch (s)", "ours", maximum=5.0, metric="ready_s"),
    Target(
        "heavy, 32-row requests / in-process ORT batch 32 (rows/s)", "heavy.rows32.c8", "ort.heavy.b32", 0.8
    ),
)

# Informative ratios printed beside the targets (no bound).
COMPARISONS: tuple[Target, ...] = (
    Target("heavy, batching, 1 worker / its limit (rows/s)", "heavy.batched.c64", HEAVY_LIMIT),
    Target("heavy, batching, 2 workers / its limit (rows/s)", "heavy.batched_w2.c64", HEAVY_LIMIT),
    Target("heavy, batching / batching off (64 conn)", "heavy.batched.c64", "heavy.unbatched.c64"),
    Target("TF Serving REST :predict / FastAPI no-op (32 conn)", _REST32, "ceiling.tfserving_rest.c32"),
    Target("FastAPI no-op / bare ASGI no-op (32 conn)", "ceiling.tfserving_rest.c32", _ASGI32),
    Target(
        "OIP gRPC ModelInfer / MLServer gRPC (32 conn, --peers)", "ours.v2_grpc.c32", "mlserver.v2_grpc.c32"
    ),
    Target(
        "OIP gRPC ModelInfer CPU per request / KServe gRPC's (32 conn, --peers)",
        "ours.v2_grpc.c32",
        "kserve.v2_grpc.c32",
        metric="cpu_us",
    ),
    Target("ours TF Serving REST / tutorial baseline (32 conn)", _REST32, "tutorial.c32"),
    Target(
        "serve alone (logs, no control plane running) / logging to a running control plane, CPU per REST",
        _REST32,
        "split.tfserving_rest.c32",
        metric="cpu_us",
    ),
)


@dataclass
class Ratio:
    """A computed ratio and whether it meets its bound (None when it has none or a row is missing)."""

    name: str
    value: float | None
    minimum: float | None
    maximum: float | None
    met: bool | None


@dataclass
class Report:
    """One run of the suite."""

    timestamp: str
    command: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    rss: dict[str, Any] | None = None
    profile_notes: list[str] = field(default_factory=list)
    startup: dict[str, Any] | None = None
    """How the server under test started: ``ready_s`` after launch, ``rss_mib`` once loaded."""
    budgets: list[dict[str, Any]] = field(default_factory=list)
    """The per-request budgets of ``--profile`` (:meth:`bench.profile.Budget.to_dict`)."""

    def row(self, key: str) -> Row | None:
        """The row with ``key``, if measured."""
        return next((r for r in self.rows if r.key == key), None)

    def _value(self, key: str, metric: str) -> float | None:
        row = self.row(key)
        if row is None:
            return None
        value = row.rows_per_s if metric == "rows_per_s" else getattr(row, metric)
        return None if value is None else float(value)

    def ratios(self, targets: tuple[Target, ...] = TARGETS) -> list[Ratio]:
        """Every target ratio (or absolute figure) of this run."""
        out = []
        for t in targets:
            value: float | None = None
            if not t.denominator:
                figure = (self.startup or {}).get(t.metric)
                value = None if figure is None else float(figure)
            else:
                names = (t.denominator,) if isinstance(t.denominator, str) else t.denominator
                refs = [self._value(name, t.metric) for name in names]
                a = self._value(t.numerator, t.metric)
                pick = max if t.best else min
                b = pick((r for r in refs if r is not None), default=None)
                if t.best:
                    refs = [r for r in refs if r is not None] or [None]  # the peers that ran
                if t.difference and a is not None and b is not None and None not in refs:
                    value = a - b
                elif a is not None and b and None not in refs:
                    value = a / b
            met: bool | None = None
            if value is not None and (t.minimum is not None or t.maximum is not None):
                met = (t.minimum is None or value >= t.minimum) and (t.maximum is None or value <= t.maximum)
            out.append(Ratio(t.name, value, t.minimum, t.maximum, met))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see ``tests/bench`` for its schema)."""
        return {
            "schema": SCHEMA,
            "timestamp": self.timestamp,
            "command": self.command,
            "machine": self.machine,
            "settings": self.settings,
            "rows": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in self.rows],
            "targets": [asdict(r) for r in self.ratios()],
            "comparisons": [asdict(r) for r in self.ratios(COMPARISONS)],
            "rss": self.rss,
            "profile_notes": self.profile_notes,
            "startup": self.startup,
            "budgets": self.budgets,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Reads a document written by :meth:`to_dict`."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document: schema {data.get('schema')!r}")
        rows = []
        for item in data["rows"]:
            item = dict(item)
            item.pop("rows_per_s", None)
            rows.append(Row(**item))
        return cls(
            timestamp=data["timestamp"],
            command=data["command"],
            machine=data["machine"],
            settings=data["settings"],
            rows=rows,
            rss=data.get("rss"),
            profile_notes=list(data.get("profile_notes", [])),
            startup=data.get("startup"),
            budgets=list(data.get("budgets", [])),
        )


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _bound(r: Ratio) -> str:
    if r.minimum is not None:
        return f"≥ {r.minimum:g}"
    if r.maximum is not None:
        return f"≤ {r.maximum:g}"
    return ""


def _verdict(r: Ratio) -> str:
    return {True: "met", False: "**not met**", None: "-"}[r.met]


def render_markdown(report: Report) -> str:
    """The results table, the target ratios and the RSS line, as Markdown."""
    m = report.machine
    lines = [
        f"Run {report.timestamp} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores; server on CPU "
        f"{m.get('server_cpu', 0)}, load generator on CPU {m.get('load_cpu', 1)}), "
        f"{report.settings.get('duration_s')} s per point after {report.settings.get('warmup_s')} s warm-up. "
        f"Command: `{report.command}`.",
        "",
        "| point | group | conns | throughput | p50 ms | p99 ms | CPU µs/req | errors | vs ref |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    refs = _reference_for(report)
    for r in report.rows:
        ref_key = refs.get(r.key)
        ref = report.row(ref_key) if ref_key else None
        vs = (
            f"{r.rows_per_s / ref.rows_per_s:.2f} × {ref.label}" if ref is not None and ref.rows_per_s else ""
        )
        conns = "" if r.connections is None else str(r.connections)
        lines.append(
            f"| {r.label} | {r.group} | {conns} | {_num(r.throughput)} {r.unit} | {_num(r.p50_ms, 2)} | "
            f"{_num(r.p99_ms, 2)} | {_num(r.cpu_us, 0)} | {r.errors} | {vs} |"
        )
    lines += ["", "| target (ratio within this run) | value | bound | verdict |", "|---|--:|--:|---|"]
    for ratio in report.ratios():
        lines.append(f"| {ratio.name} | {_num(ratio.value, 2)} | {_bound(ratio)} | {_verdict(ratio)} |")
    for ratio in report.ratios(COMPARISONS):
        lines.append(f"| {ratio.name} | {_num(ratio.value, 2)} | | |")
    if report.startup:
        st = report.startup
        lines += [
            "",
            f"Start-up of `ours` (digits, ONNX): ready {st['ready_s']:.2f} s after launch, "
            f"{st['rss_mib']:.0f} MiB resident once loaded; TensorFlow loaded: "
            f"{'yes' if st.get('tensorflow') else 'no'}.",
        ]
    if report.budgets:
        lines += ["", "Per-request budget (`--profile`: py-spy samples x the server's CPU per request):", ""]
        lines.append(_render_budgets(report.budgets))
        lines += [f"- {note}" for note in report.profile_notes]
    if report.rss:
        rss = report.rss
        lines += [
            "",
            f"RSS over a {rss['duration_s']:.0f} s run at {rss['connections']} connections "
            f"({rss['endpoint']}): {rss['start_bytes'] / 2**20:.1f} MiB after warm-up → "
            f"{rss['end_bytes'] / 2**20:.1f} MiB at the end, growth {rss['growth'] * 100:+.1f} % "
            f"(bound ≤ 10 %: {'met' if rss['growth'] <= 0.10 else '**not met**'}); "
            f"{rss['launch_bytes'] / 2**20:.1f} MiB at launch.",
        ]
    return "\n".join(lines) + "\n"


def _render_budgets(budgets: list[dict[str, Any]]) -> str:
    # A column per profiled point, a row per stage, in the order of the first budget.
    stages = list(budgets[0]["stage_us"])
    lines = [
        "| stage (µs per request) | " + " | ".join(str(b["point"]) for b in budgets) + " |",
        "|---|" + "--:|" * len(budgets),
    ]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(_num(b["stage_us"].get(stage)) for b in budgets) + " |")
    lines.append("| **CPU per request** | " + " | ".join(f"**{_num(b['cpu_us'])}**" for b in budgets) + " |")
    return "\n".join(lines)


def _reference_for(report: Report) -> dict[str, str]:
    # Each row is compared with the reference of its own kind in the same run: REST with the
    # bare ASGI no-op, gRPC with the grpc.aio no-op, the heavy model with in-process ORT.
    refs: dict[str, str] = {}
    for r in report.rows:
        if r.group in ("ours", "compare") or (r.key.startswith("ceiling.") and "_rest." in r.key):
            _, protocol, conns = r.key.split(".")
            kind = "asgi" if protocol.endswith("_rest") else "ceiling"
            refs[r.key] = f"{kind}.{protocol}.{conns}"
        elif r.key.startswith("heavy."):
            refs[r.key] = "ort.heavy.b32"
        elif r.key.startswith("tutorial."):
            refs[r.key] = "asgi.tfserving_rest." + r.key.split(".")[1]
    return refs


def write_chart(report: Report, path: Path) -> None:
    """A horizontal bar chart of rows/s per point (log scale), grouped by colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    colours = {
        "ours": "#1f77b4",
        "compare": "#aec7e8",
        "reference": "#7f7f7f",
        "baseline": "#d62728",
        "heavy": "#2ca02c",
    }
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(rows) + 1.5))
    labels = [f"{r.label}" + (f" ×{r.connections}" if r.connections else "") for r in rows]
    values = [max(r.rows_per_s, 1e-3) for r in rows]
    ax.barh(labels, values, color=[colours.get(r.group, "#9467bd") for r in rows])
    for y, r in enumerate(rows):
        ax.text(values[y], y, f" {r.rows_per_s:,.0f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("rows/s (log scale; one row per request for servers)")
    ax.set_title(f"modelloop bench {report.timestamp} — {report.machine.get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(report: Report, path: Path) -> None:
    """Writes the run's table as a page of its own (``docs/generated/bench.md``), which the
    README and docs link to instead of quoting its figures."""
    header = [
        "# The last benchmark run",
        "",
        "<!-- Generated by `make bench` (bench/suite.py, bench/report.py render_markdown); do not",
        "     edit by hand. -->",
        "",
        "What each row measures, and the dated analysis of earlier runs:",
        "[docs/performance.md](../performance.md).",
        "",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + render_markdown(report))


def write_json(report: Report, path: Path) -> None:
    """Writes the JSON document."""
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
