"""Draws the Grafana dashboard's panels from a real Prometheus into one HTML page (inline SVG).

Grafana is not a Debian package, and the docs' picture of the dashboard must come from a
machine without internet access. So this reads ``monitoring/dashboards/modelloop.json``,
runs every panel's own PromQL expressions over a time range against a Prometheus (the
dashboard variables filled in as Grafana would: ``$model`` from
``label_values(modelloop_model_versions_loaded, model)``, ``$__rate_interval`` from the
step and the scrape interval), and draws each panel where its ``gridPos`` puts it, in a
Grafana-like dark theme: time series as lines with a legend, stats as their last value,
bar gauges as bars of the last values, state timelines as coloured bands. It is not
Grafana: no tooltips, no zoom, only the panel types the dashboard uses. The page loads
nothing from elsewhere. ``make screenshots`` has headless Chromium take its picture
(``docs/images/grafana-dashboard.png``, by ``tests/monitoring/test_dashboard.py``).

Usage::

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 10 --out dashboard.html
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "monitoring" / "dashboards" / "modelloop.json"
PAGE_WIDTH = 1280
ROW_HEIGHT = 28  # pixels per gridPos unit of height (Grafana's is 30, with 8 px gaps)
GAP = 6
# Grafana's classic palette, in its order.
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a", "#96d98d")
NAMED = {"green": "#73bf69", "red": "#f2495c", "yellow": "#fade2a", "orange": "#ff780a", "blue": "#5794f2"}
MAX_SERIES = 10
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass
class Series:
    """One series of a query's answer.

    Attributes:
        name: The legend: ``legendFormat`` with the labels filled in.
        points: ``(unix time, value)``, NaN dropped.
    """

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Panel:
    """One panel of the dashboard and what its queries answered.

    Attributes:
        spec: The panel's JSON.
        series: Every target's series, in target order.
        errors: Queries Prometheus refused, with its error.
    """

    spec: dict[str, Any]
    series: list[Series] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _get(url: str, params: dict[str, str]) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(params)}", timeout=30) as answer:
        return dict(json.loads(answer.read()))


def model_values(prometheus: str) -> list[str]:
    """The dashboard's ``$model`` options: ``label_values(modelloop_model_versions_loaded, model)``."""
    body = _get(f"{prometheus}/api/v1/series", {"match[]": "modelloop_model_versions_loaded"})
    return sorted({s["model"] for s in body.get("data", []) if "model" in s})


def substitute(expr: str, *, models: Sequence[str], step: float, span: float, scrape: float) -> str:
    """The expression with the dashboard variables filled in as Grafana fills them."""
    rate = max(step + scrape, 4 * scrape)  # Grafana's $__rate_interval
    values = {
        "$__rate_interval": f"{math.ceil(rate)}s",
        "$__interval": f"{math.ceil(step)}s",
        "$__range": f"{math.ceil(span)}s",
        "${model}": "(" + "|".join(re.escape(m) for m in models) + ")" if models else ".*",
    }
    values["$model"] = values["${model}"]
    for name, value in values.items():
        expr = expr.replace(name, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    """``legendFormat`` with ``{{label}}`` filled in; without a format, Grafana's ``{a="b"}``."""
    if fmt:
        return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return "{" + shown + "}"


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included, in the grid's order."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return sorted(found, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def query_panels(
    dashboard: dict[str, Any], prometheus: str, *, start: float, end: float, scrape: float = 1.0
) -> list[Panel]:
    """Runs every panel's targets over ``[start, end]`` (``/api/v1/query_range``, about 240 steps)."""
    span = end - start
    step = max(1.0, span / 240)
    models = model_values(prometheus)
    panels = []
    for spec in all_panels(dashboard):
        panel = Panel(spec)
        for target in spec.get("targets", []):
            expr = substitute(target["expr"], models=models, step=step, span=span, scrape=scrape)
            params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
            try:
                body = _get(f"{prometheus}/api/v1/query_range", params)
            except OSError as exc:  # urllib's HTTPError (a 400 for a bad expression) included
                panel.errors.append(f"{target.get('refId', '?')}: {exc}")
                continue
            for result in body["data"]["result"]:
                points = [(float(t), float(v)) for t, v in result["values"] if math.isfinite(float(v))]
                panel.series.append(Series(legend(target.get("legendFormat", ""), result["metric"]), points))
        panels.append(panel)
    return panels


# -- drawing ------------------------------------------------------------------------------


def format_value(value: float, unit: str | None) -> str:
    """A value in the panel's unit, as Grafana writes it (the few units the dashboard uses)."""
    if unit == "percentunit":
        return f"{value * 100:.0f}%" if abs(value) >= 0.1 or value == 0 else f"{value * 100:.1f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    suffix = " req/s" if unit == "reqps" else ""
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}K{suffix}"
    return f"{value:.3g}{suffix}" if value else f"0{suffix}"


def _clock(t: float, seconds: bool = False) -> str:
    return time.strftime("%H:%M:%S" if seconds else "%H:%M", time.gmtime(t))


def _no_data(width: float, height: float) -> str:
    return f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">No data</text>'


def _time_ticks(x: Any, t0: float, t1: float, y: float) -> str:
    """Time labels along the bottom, about one per 100 px, the first and last kept inside the panel."""
    parts = []
    gaps = max(1, min(4, int((x(t1) - x(t0)) / 100)))
    for i in range(gaps + 1):
        t = t0 + (t1 - t0) * i / gaps
        anchor = "start" if i == 0 else "end" if i == gaps else "middle"
        label = _clock(t, seconds=t1 - t0 < 600)
        parts.append(f'<text x="{x(t):.1f}" y="{y:.1f}" text-anchor="{anchor}">{label}</text>')
    return "".join(parts)


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _timeseries(panel: Panel, width: float, height: float, t0: float, t1: float) -> str:
    unit = panel.spec.get("fieldConfig", {}).get("defaults", {}).get("unit")
    series = [s for s in panel.series if s.points][:MAX_SERIES]
    if not series:
        return _no_data(width, height)
    legend_rows = min(3, math.ceil(len(series) / 3))
    left, right, top, bottom = 74, 12, 6, 20 + 15 * legend_rows
    plot_w, plot_h = width - left - right, max(20.0, height - top - bottom)
    values = [v for s in series for _, v in s.points]
    low = min([0.0, *values])
    high = max(values)
    if high - low < 1e-6:
        high = low + 1.0  # a flat line at zero: a readable axis, as Grafana draws it
    elif unit == "percentunit" and 0.5 < high <= 1.0:
        high = 1.0
    else:
        high = high + (high - low) * 0.08

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * plot_w

    def y(v: float) -> float:
        return top + plot_h - (v - low) / (high - low) * plot_h

    parts = []
    for i in range(4):
        v = low + (high - low) * i / 3
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w:.1f}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
            f"{html.escape(format_value(v, unit))}</text>"
        )
    for i in range(5):
        t = t0 + (t1 - t0) * i / 4
        parts.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + plot_h:.1f}" class="grid"/>'
        )
    parts.append(_time_ticks(x, t0, t1, top + plot_h + 14))
    for i, s in enumerate(series):
        # A gap of more than three steps breaks the line, as Grafana's null handling does.
        step = (t1 - t0) / 240
        segments: list[list[str]] = [[]]
        last = None
        for t, v in s.points:
            if last is not None and t - last > 3 * step:
                segments.append([])
            segments[-1].append(f"{x(t):.1f},{y(v):.1f}")
            last = t
        for seg in segments:
            if len(seg) > 1:
                parts.append(f'<polyline points="{" ".join(seg)}" stroke="{_colour(i)}" class="line"/>')
            elif seg:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{_colour(i)}"/>')
    column = (width - left) / 3
    for i, s in enumerate(series[: 3 * legend_rows]):
        lx, ly = left + (i % 3) * column, top + plot_h + 30 + 15 * (i // 3)
        name = s.name if len(s.name) * 6.2 < column - 24 else s.name[: int((column - 24) / 6.2) - 1] + "…"
        parts.append(
            f'<rect x="{lx:.1f}" y="{ly - 8:.1f}" width="14" height="4" fill="{_colour(i)}"/>'
            f'<text x="{lx + 18:.1f}" y="{ly:.1f}">{html.escape(name)}</text>'
        )
    return "".join(parts)


def _stat(panel: Panel, width: float, height: float) -> str:
    unit = panel.spec.get("fieldConfig", {}).get("defaults", {}).get("unit")
    series = [s for s in panel.series if s.points][:4]
    if not series:
        return _no_data(width, height)
    parts = []
    cell = height / len(series)
    for i, s in enumerate(series):
        value = format_value(s.points[-1][1], unit)
        cy = cell * i + cell / 2
        parts.append(
            f'<text x="{width / 2:.0f}" y="{cy - 4:.0f}" text-anchor="middle" class="big" '
            f'fill="{PALETTE[0]}">{html.escape(value)}</text>'
            f'<text x="{width / 2:.0f}" y="{cy + 16:.0f}" text-anchor="middle">{html.escape(s.name)}</text>'
        )
    return "".join(parts)


def _bargauge(panel: Panel, width: float, height: float) -> str:
    unit = panel.spec.get("fieldConfig", {}).get("defaults", {}).get("unit")
    bars = sorted(((s.points[-1][1], s.name) for s in panel.series if s.points), reverse=True)[:MAX_SERIES]
    if not bars:
        return _no_data(width, height)
    top_value = max(v for v, _ in bars) or 1.0
    row = min(26.0, (height - 4) / len(bars))
    label_w = min(220.0, width * 0.42)
    parts = []
    for i, (value, name) in enumerate(bars):
        y0 = 2 + i * row
        w = (width - label_w - 70) * value / top_value
        parts.append(
            f'<text x="{label_w - 6:.0f}" y="{y0 + row * 0.65:.1f}" text-anchor="end">'
            f"{html.escape(name)}</text>"
            f'<rect x="{label_w:.0f}" y="{y0 + 2:.1f}" width="{width - label_w - 70:.1f}" '
            f'height="{row - 5:.1f}" '
            f'fill="#22252b"/><rect x="{label_w:.0f}" y="{y0 + 2:.1f}" width="{max(w, 1):.1f}" '
            f'height="{row - 5:.1f}" fill="url(#gauge)"/>'
            f'<text x="{width - 64:.0f}" y="{y0 + row * 0.65:.1f}">'
            f"{html.escape(format_value(value, unit))}</text>"
        )
    return "".join(parts)


def _state_timeline(panel: Panel, width: float, height: float, t0: float, t1: float) -> str:
    mappings: dict[str, dict[str, str]] = {}
    for mapping in panel.spec.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        mappings.update(mapping.get("options", {}))
    series = [s for s in panel.series if s.points][:MAX_SERIES]
    if not series:
        return _no_data(width, height)
    left, bottom = min(200.0, width * 0.3), 18
    row = min(30.0, (height - bottom - 4) / len(series))
    step = (t1 - t0) / 240
    parts = []

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * (width - left - 8)

    for i, s in enumerate(series):
        y0 = 2 + i * row
        parts.append(
            f'<text x="{left - 6:.0f}" y="{y0 + row * 0.6:.1f}" text-anchor="end">'
            f"{html.escape(s.name)}</text>"
        )
        start, current = s.points[0][0], s.points[0][1]
        for (t, _), following in zip(
            s.points, [*s.points[1:], (s.points[-1][0] + step, math.nan)], strict=True
        ):
            if following[1] != current or following[0] - t > 3 * step:
                mapped = mappings.get(f"{current:g}", {})
                colour = NAMED.get(mapped.get("color", ""), mapped.get("color") or _colour(i))
                text = mapped.get("text", f"{current:g}")
                x0, x1 = x(start), x(t + step)
                parts.append(
                    f'<rect x="{x0:.1f}" y="{y0 + 2:.1f}" width="{max(x1 - x0, 1):.1f}" '
                    f'height="{row - 4:.1f}" '
                    f'fill="{colour}" fill-opacity="0.8"/>'
                )
                if x1 - x0 > 7 * len(text):
                    parts.append(
                        f'<text x="{(x0 + x1) / 2:.1f}" y="{y0 + row * 0.6:.1f}" text-anchor="middle" '
                        f'class="on">{html.escape(text)}</text>'
                    )
                start, current = following
    parts.append(_time_ticks(x, t0, t1, height - 4))
    return "".join(parts)


def render_panel(panel: Panel, width: float, height: float, t0: float, t1: float) -> str:
    """One panel as a positioned ``<div>`` with its title and an SVG body."""
    kind = panel.spec.get("type")
    title = html.escape(panel.spec.get("title", ""))
    if kind == "row":
        return f'<div class="row"><span>⌄</span> {title}</div>'
    body_h = height - 30
    if kind == "stat":
        body = _stat(panel, width, body_h)
    elif kind == "bargauge":
        body = _bargauge(panel, width, body_h)
    elif kind == "state-timeline":
        body = _state_timeline(panel, width, body_h, t0, t1)
    else:
        body = _timeseries(panel, width, body_h, t0, t1)
    errors = "".join(f'<p class="err">{html.escape(e)}</p>' for e in panel.errors)
    return (
        f'<div class="panel" data-type="{html.escape(str(kind))}" data-series="{len(panel.series)}">'
        f'<div class="title">{title}</div>{errors}'
        f'<svg width="{width:.0f}" height="{body_h:.0f}" viewBox="0 0 {width:.0f} {body_h:.0f}" '
        f'xmlns="http://www.w3.org/2000/svg">'
        '<defs><linearGradient id="gauge"><stop offset="0" stop-color="#73bf69"/>'
        '<stop offset="1" stop-color="#fade2a"/></linearGradient></defs>'
        f"{body}</svg></div>"
    )


STYLE = (
    "body{margin:0;background:#111217;color:#ccccdc;font:12px Inter,Helvetica,Arial,sans-serif}"
    ".bar{display:flex;gap:16px;align-items:center;padding:10px 14px;border-bottom:1px solid #2a2d35}"
    ".bar h1{font-size:16px;margin:0;color:#fff}.bar .var{background:#181b1f;border:1px solid #2a2d35;"
    "padding:3px 8px;border-radius:2px}.bar .note{margin-left:auto;color:#8e8e9e}"
    ".grid{position:relative;margin:8px}.cell{position:absolute}"
    ".panel{background:#181b1f;border:1px solid #2a2d35;border-radius:2px;height:100%;overflow:hidden}"
    ".panel .title{font-weight:500;color:#fff;font-size:13px;padding:6px 8px;height:18px}"
    ".row{color:#fff;font-size:14px;font-weight:500;padding:4px 0}"
    "svg text{fill:#ccccdc;font:11px Inter,Helvetica,Arial,sans-serif}"
    "svg text.big{font-size:30px;font-weight:500}"
    "svg text.on{fill:#111217}svg .grid{stroke:#2a2d35;stroke-width:1}"
    "svg .line{fill:none;stroke-width:1.5}.err{color:#f2495c;margin:2px 8px}"
)


def render_page(
    dashboard: dict[str, Any], panels: Sequence[Panel], *, t0: float, t1: float, models: str
) -> str:
    """The whole dashboard: a title bar with the variables, then the panels on a 24-column grid."""
    column = (PAGE_WIDTH - 16) / 24
    cells = []
    bottom = 0
    for panel in panels:
        pos = panel.spec["gridPos"]
        left, top = pos["x"] * column, pos["y"] * ROW_HEIGHT
        width, height = pos["w"] * column - GAP, pos["h"] * ROW_HEIGHT - GAP
        bottom = max(bottom, top + height)
        cells.append(
            f'<div class="cell" style="left:{left:.0f}px;top:{top:.0f}px;'
            f'width:{width:.0f}px;height:{height:.0f}px">'
            f"{render_panel(panel, width, height, t0, t1)}</div>"
        )
    span = f"{_clock(t0, seconds=True)} to {_clock(t1, seconds=True)} UTC"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(dashboard.get('title', 'dashboard'))}</title>"
        f'<link rel="icon" href="data:,"><style>{STYLE}</style></head><body>'
        f'<div class="bar"><h1>{html.escape(dashboard.get("title", ""))}</h1>'
        f'<span class="var">Model: {html.escape(models)}</span><span class="var">{span}</span>'
        '<span class="note">the dashboard\'s own queries against Prometheus, drawn by '
        "scripts/render_dashboard.py (not Grafana)</span></div>"
        f'<div class="grid" style="height:{bottom + GAP:.0f}px">{"".join(cells)}</div></body></html>'
    )


def render(
    prometheus: str, *, minutes: float, dashboard_path: Path = DASHBOARD, now: float | None = None
) -> str:
    """The dashboard over the last ``minutes`` of ``prometheus``, as an HTML page."""
    dashboard = json.loads(dashboard_path.read_text())
    t1 = time.time() if now is None else now
    t0 = t1 - minutes * 60
    panels = query_panels(dashboard, prometheus, start=t0, end=t1)
    models = ", ".join(model_values(prometheus)) or "All"
    return render_page(dashboard, panels, t0=t0, t1=t1, models=models)


def main(argv: Sequence[str] | None = None) -> int:
    """``render_dashboard.py --prometheus URL [--minutes N] [--dashboard PATH] --out PAGE.html``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=15.0, help="time range, ending now (default 15)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help="Grafana dashboard JSON")
    parser.add_argument("--out", type=Path, required=True, help="the HTML page to write")
    args = parser.parse_args(argv)
    try:
        page = render(args.prometheus.rstrip("/"), minutes=args.minutes, dashboard_path=args.dashboard)
    except (OSError, ValueError, KeyError) as exc:
        print(f"render_dashboard: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(page)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
