"""The live health section: each model's verdicts and its curves, inline SVG drawn on the server.

:func:`render_health` turns each model's history and latest evaluations into an HTML
fragment: per model, its verdicts (:func:`render_verdicts`: per version drift, prediction
drift, labelled accuracy, the label-free estimate with its band, data quality and traffic,
each a coloured chip with a word and a mark; the quarantined labelers and the retrain
runs), then line charts over time (accuracy and the estimate with its band, drift share,
prediction drift, data quality, request rate, error rate, p99 latency) and the baseline
histogram beside the current one for the top drifted features. The status page at ``/``
fetches the fragment every few seconds, swaps it in, and moves each model's verdicts into
its card, so it updates without a reload; nothing comes from outside the server.

Every series is told apart by its dash pattern and a text label at its end, and every
chart has a text legend, so colour is never the only cue. Every value from a model or a
client (names, features) is escaped.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from modelloop.monitoring.drift import PREDICTION_DRIFT_THRESHOLD
from modelloop.monitoring.histogram import FeatureHistogram
from modelloop.monitoring.verdicts import ModelView, effective_floor, render_verdicts

WIDTH = 470
HEIGHT = 190
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 86, 36, 26
# Dash patterns by series, then by version: told apart without colour.
_DASHES = ("", "7 4", "2 3", "10 3 2 3", "4 2 4 6")
# A colour per version as well, for those who see it; never the only cue.
_COLOURS = ("#1b4f9c", "#b4441b", "#2e7d32", "#6a1b9a", "#5d4037")


@dataclass
class Line:
    """One series of a chart.

    Attributes:
        label: Text written at the end of the line and in the legend.
        points: ``(t, value)``; None values break the line.
        dash: SVG ``stroke-dasharray``.
        colour: Stroke colour.
        band: Optional ``(t, low, high)`` drawn as a shaded area under the line.
    """

    label: str
    points: list[tuple[float, float | None]]
    dash: str = ""
    colour: str = "#222"
    band: list[tuple[float, float, float]] = field(default_factory=list)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def line_chart(
    title: str,
    lines: Sequence[Line],
    *,
    t0: float,
    t1: float,
    y_min: float = 0.0,
    y_max: float | None = None,
    min_top: float = 1e-9,
    unit: str = "",
    digits: int = 2,
    threshold: tuple[float, str] | None = None,
    events: Sequence[tuple[float, str]] = (),
) -> str:
    """An SVG line chart over time.

    Args:
        title: The chart's title (plain text).
        lines: The series.
        t0: Left edge (Unix time).
        t1: Right edge (Unix time).
        y_min: Bottom of the y axis. Defaults to 0.
        y_max: Top of the y axis; None = the data's maximum, at least ``min_top``.
        min_top: The lowest top of an automatic axis (a flat zero line stays readable).
            Defaults to 1e-9.
        unit: Appended to the y tick labels. Defaults to "".
        digits: Decimals of the y tick labels. Defaults to 2.
        threshold: ``(value, label)`` drawn as a dashed horizontal rule. Defaults to None.
        events: ``(t, label)`` drawn as labelled vertical rules (a new version). Defaults to none.

    Returns:
        The ``<svg>`` element.
    """
    values = [v for line in lines for _, v in line.points if v is not None and math.isfinite(v)]
    values += [h for line in lines for _, _, h in line.band]
    top = y_max if y_max is not None else max([*values, y_min + min_top])
    if threshold is not None and y_max is None:
        top = max(top, threshold[0])
    if top <= y_min:
        top = y_min + 1.0
    if t1 <= t0:
        t1 = t0 + 1.0
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def x(t: float) -> float:
        return _LEFT + (t - t0) / (t1 - t0) * plot_w

    def y(v: float) -> float:
        v = min(max(v, y_min), top)
        return _TOP + plot_h - (v - y_min) / (top - y_min) * plot_h

    label = html.escape(title)
    parts = [
        f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{label}</title>",
        f'<text x="{_LEFT}" y="14" class="ct">{label}</text>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for i in range(3):
        v = y_min + (top - y_min) * i / 2
        parts.append(
            f'<text x="{_LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end" class="tick">'
            f"{v:.{digits}f}{unit}</text>"
        )
        if i:
            parts.append(
                f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
            )
    for i, t in enumerate((t0, (t0 + t1) / 2, t1)):
        anchor = ("start", "middle", "end")[i]
        parts.append(
            f'<text x="{x(t):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" class="tick">{_clock(t)}</text>'
        )
    if threshold is not None:
        ty = y(threshold[0])
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#000" '
            f'stroke-dasharray="1 3"/><text x="{_LEFT + plot_w + 4}" y="{ty + 4:.1f}" class="tick">'
            f"{html.escape(threshold[1])}</text>"
        )
    for t, text in events:
        if t0 <= t <= t1:
            ex = x(t)
            parts.append(
                f'<line x1="{ex:.1f}" x2="{ex:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="#000" '
                f'stroke-dasharray="3 2"/><text x="{ex + 3:.1f}" y="{_TOP + 10}" class="ev">'
                f"{html.escape(text)}</text>"
            )
    legend_x = _LEFT
    for line in lines:
        if line.band:
            upper = " ".join(f"{x(t):.1f},{y(h):.1f}" for t, _, h in line.band)
            lower = " ".join(f"{x(t):.1f},{y(lo):.1f}" for t, lo, _ in reversed(line.band))
            parts.append(
                f'<polygon points="{upper} {lower}" fill="{line.colour}" fill-opacity="0.12" stroke="none"/>'
            )
        segments: list[list[str]] = [[]]
        for t, point in line.points:
            if point is None or not math.isfinite(point):
                segments.append([])
                continue
            segments[-1].append(f"{x(t):.1f},{y(point):.1f}")
        dash = f' stroke-dasharray="{line.dash}"' if line.dash else ""
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{line.colour}"/>')
            elif seg:
                parts.append(
                    f'<polyline points="{" ".join(seg)}" fill="none" stroke="{line.colour}" '
                    f'stroke-width="1.6"{dash}/>'
                )
        last = next(((t, v) for t, v in reversed(line.points) if v is not None and math.isfinite(v)), None)
        if last is not None and last[1] is not None:
            parts.append(
                f'<text x="{x(last[0]) + 4:.1f}" y="{y(last[1]) + 4:.1f}" class="end">'
                f"{html.escape(line.label)}</text>"
            )
        # Legend: a dash sample and the label, in the title row.
        parts.append(
            f'<line x1="{legend_x}" x2="{legend_x + 20}" y1="25" y2="25" stroke="{line.colour}" '
            f'stroke-width="1.6"{dash}/><text x="{legend_x + 23}" y="29" class="tick">'
            f"{html.escape(line.label)}</text>"
        )
        legend_x += 30 + 6 * len(line.label)
    if not values:
        parts.append(
            f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" text-anchor="middle" class="tick">'
            "no data yet</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(histogram: FeatureHistogram, version: int) -> str:
    """The baseline histogram beside the current one: outlined bars are the baseline, filled bars now.

    Args:
        histogram: The feature's shares per bin.
        version: The version whose window it is.

    Returns:
        The ``<svg>`` element.
    """
    bins = len(histogram.baseline)
    width, height = 300, 150
    left, bottom, top_pad = 34, 30, 30
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    top = max([*histogram.baseline, *histogram.current, 1e-9])
    slot = plot_w / max(bins, 1)
    bar = slot * 0.4
    name = html.escape(histogram.name)
    parts = [
        f'<svg class="hist" role="img" aria-label="{name}: baseline and current histogram" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{name} (v{version}): baseline and current shares per bin</title>",
        f'<text x="{left}" y="13" class="ct">{name} (v{version})</text>',
        f'<rect x="{left + 120}" y="18" width="10" height="8" fill="#fff" stroke="#000"/>'
        f'<text x="{left + 133}" y="26" class="tick">baseline</text>'
        f'<rect x="{left + 185}" y="18" width="10" height="8" fill="#444"/>'
        f'<text x="{left + 198}" y="26" class="tick">current</text>',
        f'<text x="{left - 4}" y="{top_pad + 8}" text-anchor="end" class="tick">{top:.0%}</text>',
        f'<text x="{left - 4}" y="{top_pad + plot_h}" text-anchor="end" class="tick">0%</text>',
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top_pad + plot_h}" '
        f'y2="{top_pad + plot_h}" stroke="#999"/>',
    ]
    labels = histogram.bin_labels()
    for i in range(bins):
        x0 = left + i * slot + slot * 0.1
        for j, (share, style) in enumerate(
            ((histogram.baseline[i], 'fill="#fff" stroke="#000"'), (histogram.current[i], 'fill="#444"'))
        ):
            h = share / top * plot_h
            parts.append(
                f'<rect x="{x0 + j * bar:.1f}" y="{top_pad + plot_h - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" {style}><title>{html.escape(labels[i] if i < len(labels) else "")}: '
                f"{'baseline' if j == 0 else 'current'} {share:.1%}</title></rect>"
            )
    if labels:
        parts.append(f'<text x="{left}" y="{height - 12}" class="tick">{html.escape(labels[0])}</text>')
        parts.append(
            f'<text x="{left + plot_w}" y="{height - 12}" text-anchor="end" class="tick">'
            f"{html.escape(labels[-1])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _series(points: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[float, float | None]]:
    found = []
    for p in points:
        value = p.get(key)
        found.append((float(p["t"]), None if value is None else float(value) * scale))
    return found


def render_model(model: ModelView, *, t0: float, t1: float) -> str:
    """The section of one model: its verdicts (:func:`render_verdicts`), charts and histograms."""
    name = html.escape(model.name)
    parts = [
        f'<section class="model" data-model="{name}"><h2>{name}</h2>',
        render_verdicts(model),
    ]
    events = [(v.points[0]["t"], f"v{v.version} first seen") for v in model.versions[1:] if v.points]

    def lines(key: str, title: str, scale: float = 1.0, dash_offset: int = 0) -> list[Line]:
        found = []
        for i, v in enumerate(model.versions):
            found.append(
                Line(
                    f"v{v.version} {title}".strip(),
                    _series(v.points, key, scale),
                    dash=_DASHES[(i + dash_offset) % len(_DASHES)],
                    colour=_COLOURS[i % len(_COLOURS)],
                )
            )
        return found

    accuracy = lines("accuracy", "labelled")
    estimated = lines("estimated_accuracy", "estimated", dash_offset=1)
    for line, v in zip(estimated, model.versions, strict=True):
        line.band = [
            (float(p["t"]), float(p["estimated_accuracy_lower"]), float(p["estimated_accuracy_upper"]))
            for p in v.points
            if p.get("estimated_accuracy_lower") is not None and p.get("estimated_accuracy_upper") is not None
        ]
    floor = (effective_floor(model), "floor")
    charts = [
        line_chart(
            "Accuracy: labelled and estimated without labels",
            [*accuracy, *estimated],
            t0=t0,
            t1=t1,
            y_max=1.0,
            threshold=floor,
            events=events,
        ),
        line_chart(
            "Share of drifted features", lines("drift_share", ""), t0=t0, t1=t1, y_max=1.0, events=events
        ),
        line_chart(
            "Prediction drift (PSI)",
            lines("prediction_drift", ""),
            t0=t0,
            t1=t1,
            min_top=0.5,
            # Where ModelPredictionDrift fires (after 5 minutes above it).
            threshold=(PREDICTION_DRIFT_THRESHOLD, "alert"),
            events=events,
        ),
        line_chart(
            "Data quality: worst feature",
            [*lines("missing_share", "missing"), *lines("out_of_range_share", "out of range", dash_offset=2)],
            t0=t0,
            t1=t1,
            min_top=0.1,
            events=events,
        ),
        line_chart(
            "Requests per second",
            lines("request_rate", ""),
            t0=t0,
            t1=t1,
            digits=1,
            min_top=1.0,
            events=events,
        ),
        line_chart("Server error rate", lines("error_rate", ""), t0=t0, t1=t1, min_top=0.05, events=events),
        line_chart(
            "p99 latency (ms)",
            lines("p99_seconds", "", scale=1000.0),
            t0=t0,
            t1=t1,
            digits=1,
            min_top=10.0,
            events=events,
        ),
    ]
    parts.append('<div class="charts">' + "".join(charts) + "</div>")
    histograms = [histogram_chart(h, v.version) for v in model.versions for h in v.histograms]
    if histograms:
        parts.append("<h3>Top drifted features: baseline (outlined) beside current (filled)</h3>")
        parts.append('<div class="charts">' + "".join(histograms) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def render_health(models: Sequence[ModelView], *, t0: float, t1: float) -> str:
    """The health fragment of every model.

    Args:
        models: The models to show.
        t0: Start of the time axis (Unix time).
        t1: End of the time axis (Unix time), usually now.

    Returns:
        An HTML fragment (no ``<html>`` wrapper).
    """
    body = "".join(render_model(m, t0=t0, t1=t1) for m in models) or "<p>No models.</p>"
    return (
        f'<p class="updated">Health from {_clock(t0)} to {_clock(t1)} UTC (updated {_clock(t1)}).</p>{body}'
    )


STYLE = (
    "#health .model,#health>.updated{max-width:100%}"
    "#health .model{background:#fff;border:1px solid #d8dde4;border-radius:10px;padding:.8rem 1rem;"
    "margin:0 0 1rem;min-width:0}#health .model h2{font-size:1.1rem;margin:0 0 .4rem}"
    "#health .updated{color:#5b6472;font-size:.85rem;margin:.2rem 0 .6rem}"
    "#health .charts{display:grid;gap:.5rem;"
    "grid-template-columns:repeat(auto-fill,minmax(min(100%,360px),1fr))}"
    "#health svg{font:11px sans-serif;width:100%;height:auto;max-width:520px;border:1px solid #eef0f3;"
    "border-radius:6px;background:#fff}#health svg.hist{max-width:340px}"
    "#health .ct{font-weight:bold}#health .tick{fill:#333}#health .end{fill:#000;font-size:10px}"
    "#health .ev{fill:#000;font-size:10px}#health h3{font-size:.95rem;margin:.8rem 0 .3rem}"
    ".verdicts .vrow{border-top:1px solid #eef0f3;padding:.4rem 0}.verdicts .vname{font-weight:600}"
    # In a card, a version the card lists shows its state there only.
    ".verdicts .vstate{font-weight:400}.model-card .vrow.listed .vstate{display:none}"
    ".verdicts .chips{display:flex;flex-wrap:wrap;gap:.3rem;margin:.25rem 0}"
    ".verdicts .model-chips{border-top:1px solid #eef0f3;padding-top:.45rem}"
    ".verdicts .detail,.verdicts .retrain-skipped{color:#5b6472;font-size:.82rem;margin:.15rem 0}"
    ".chip{display:inline-block;border-radius:6px;padding:.05rem .45rem;font-size:.82rem;"
    "border:1px solid currentColor}"
    ".chip.ok{color:#1e7b34;background:#e3f4e7}.chip.warn{color:#8a5a00;background:#fdf1d6}"
    ".chip.bad{color:#b3261e;background:#fde4e1;font-weight:600}.chip.idle{color:#555;background:#eceff3}"
    # A mark besides the colour: the verdict reads without it.
    '.chip.ok::before{content:"\\2713  "}.chip.warn::before{content:"!  "}'
    '.chip.bad::before{content:"\\2717  "}.chip.idle::before{content:"\\2026  "}'
)
"""The health section's styles, verdicts included (inline: the page loads nothing from elsewhere)."""
