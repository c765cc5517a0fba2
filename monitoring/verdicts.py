"""What the health page shows of a model, and its verdicts at the alert rules' levels.

:class:`ModelView` and :class:`VersionView` carry a model's history and latest evaluations
to the page; :func:`render_verdicts` turns them into coloured chips (drift, prediction drift,
labelled accuracy, the label-free estimate with its band, data quality, traffic, then the
quarantined labelers and the retrain runs), each with a word and a mark so colour is never
the only cue. The curves are :mod:`~modelloop.monitoring.page`'s. Every value from a model or
a client is escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from modelloop.monitoring.drift import PREDICTION_DRIFT_THRESHOLD
from modelloop.monitoring.histogram import FeatureHistogram
from modelloop.monitoring.report import EvaluationReport

RETRAIN_OUTCOMES = ("blessed", "rejected", "failed")
# The verdicts' levels are the alert rules' (monitoring/rules/modelloop.rules.yml), so the
# page turns red where an alert would fire. Accuracy and the estimate: the model's
# accuracy_floor, else the rules' fleet-wide floor.
DEFAULT_ACCURACY_FLOOR = 0.8
# The worst feature's missing or out-of-range share from which data quality warns.
QUALITY_WARN_SHARE = 0.05
# The server error rate from which traffic is bad (any error is a warning) and the p99 from
# which it warns.
ERROR_RATE_BAD = 0.05
P99_WARN_SECONDS = 0.5


def fmt(value: float | None, digits: int = 3) -> str:
    """A value with ``digits`` decimals, or a dash for None."""
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class VersionView:
    """What the page shows of one version.

    Attributes:
        version: Version.
        state: Its state in the registry ("" when no longer loaded).
        points: Its history, oldest first.
        latest: The latest in-memory evaluation as history values, or None.
        histograms: Baseline and current histograms of its top drifted features.
        estimate_note: Why there is no estimate, else "".
        report: The latest evaluation, for what its history point leaves out (the window,
            label counts, why drift is not judged yet), or None.
    """

    version: int
    state: str
    points: list[dict[str, Any]]
    latest: dict[str, Any] | None = None
    histograms: tuple[FeatureHistogram, ...] = ()
    estimate_note: str = ""
    report: EvaluationReport | None = None


@dataclass(frozen=True)
class ModelView:
    """What the page shows of one model.

    Attributes:
        name: Model name.
        versions: Its versions, oldest first.
        retrain_runs: Runs by outcome (blessed, rejected, failed) since the server started.
        accuracy_floor: The model's accuracy floor, or None (the verdicts and the accuracy
            chart then use the alert rules' ``DEFAULT_ACCURACY_FLOOR``).
        error: Why the history could not be read (store down), else "".
        retrain_note: Why the last drift alert started no retrain, else "".
        quarantined: The model's quarantined labeler sources, each with why.
    """

    name: str
    versions: list[VersionView]
    retrain_runs: dict[str, int] = field(default_factory=dict)
    accuracy_floor: float | None = None
    error: str = ""
    retrain_note: str = ""
    quarantined: dict[str, list[str]] = field(default_factory=dict)


def _chip(kind: str, verdict: str, text: str, title: str = "") -> str:
    """One verdict: a word or value in its verdict's colour, with a mark that does not need colour."""
    hint = f' title="{html.escape(title, quote=True)}"' if title else ""
    return f'<span class="chip {verdict}" data-verdict="{kind}"{hint}>{text}</span>'


def _drift_chip(p: dict[str, Any], report: EvaluationReport | None) -> str:
    if report is not None and report.drift is None:
        reason = report.drift_error or f"collecting ({report.window_rows}/{report.min_rows} rows)"
        return _chip("drift", "idle", f"drift: {html.escape(reason)}")
    share = p.get("drift_share")
    if share is None:
        return _chip("drift", "idle", "drift –")
    counted = ""
    if report is not None and report.drift is not None:
        counted = f" ({report.drift.n_drifted}/{len(report.drift.features)})"
    if p.get("drift_detected"):
        return _chip("drift", "bad", f"DRIFT {share:.0%}{counted}", "share of drifted features")
    return _chip("drift", "ok", f"no drift {share:.0%}{counted}", "share of drifted features")


def _prediction_drift_chip(p: dict[str, Any]) -> str:
    value = p.get("prediction_drift")
    if value is None:
        return _chip("prediction-drift", "idle", "prediction drift –")
    if value >= PREDICTION_DRIFT_THRESHOLD:
        return _chip("prediction-drift", "warn", f"prediction drift {value:.3f} (alert level)", "PSI")
    return _chip("prediction-drift", "ok", f"prediction drift {value:.3f}", "PSI")


def _accuracy_chip(p: dict[str, Any], report: EvaluationReport | None, floor: float) -> str:
    if report is not None:
        acc, labels = report.accuracy, "?" if report.labels is None else str(report.labels)
        if report.store_error:
            return _chip("accuracy", "bad", f"store unavailable: {html.escape(report.store_error)}")
        if acc is None or acc.value is None:
            return _chip("accuracy", "idle", f"no labels ({labels})")
        text = f"{acc.metric} {acc.value:.3f}" + ("" if acc.ready else " (too few labels)")
        text += f", {acc.rows} in window, {labels} labels"
        if not acc.ready:
            return _chip("accuracy", "idle", text)
        if acc.metric == "accuracy" and acc.value < floor:
            return _chip("accuracy", "bad", f"{text}, below the floor {floor:.2f}")
        return _chip("accuracy", "ok", text)
    value = p.get("accuracy")
    if value is None:
        return _chip("accuracy", "idle", "accuracy –")
    if value < floor:
        return _chip("accuracy", "bad", f"accuracy {value:.3f}, below the floor {floor:.2f}")
    return _chip("accuracy", "ok", f"accuracy {value:.3f}")


def _estimate_chip(p: dict[str, Any], note: str, floor: float) -> str:
    value = p.get("estimated_accuracy")
    if value is None:
        return _chip("estimate", "idle", f"estimate: {html.escape(note or '–')}")
    lower, upper = p.get("estimated_accuracy_lower"), p.get("estimated_accuracy_upper")
    text = f"estimated {value:.3f} ({fmt(lower)}–{fmt(upper)})"
    title = "accuracy estimated without labels, with its 95% band"
    if upper is not None and upper < floor:
        return _chip("estimate", "bad", f"{text}, below the floor", title)
    if lower is not None and lower < floor:
        return _chip("estimate", "warn", f"{text}, band reaches the floor", title)
    return _chip("estimate", "ok", text, title)


def _quality_chip(p: dict[str, Any]) -> str:
    missing, outside = p.get("missing_share"), p.get("out_of_range_share")
    if missing is None or outside is None:
        return _chip("quality", "idle", "data quality –")
    constant = ", ".join(html.escape(str(f)) for f in p.get("constant_features") or []) or "none"
    text = f"missing {missing:.1%} · out of range {outside:.1%} · became constant: {constant}"
    worst = "worst feature" if constant == "none" else "worst feature; features that became constant"
    bad = constant != "none" or max(missing, outside) >= QUALITY_WARN_SHARE
    return _chip("quality", "warn" if bad else "ok", text, worst)


def _traffic_chip(p: dict[str, Any]) -> str:
    rate, errors, p99 = p.get("request_rate"), p.get("error_rate"), p.get("p99_seconds")
    if rate is None and errors is None:
        return _chip("traffic", "idle", "traffic –")
    text = (
        f"{fmt(rate, 1)} req/s · {'–' if errors is None else f'{errors:.1%}'} server errors · "
        f"p99 {'–' if p99 is None else f'{p99 * 1000:.1f} ms'}"
    )
    verdict = "ok" if not errors else ("bad" if errors >= ERROR_RATE_BAD else "warn")
    if verdict == "ok" and p99 is not None and p99 > P99_WARN_SECONDS:
        verdict = "warn"
    return _chip("traffic", verdict, text)


def _version_verdicts(view: VersionView, floor: float) -> str:
    p = view.latest or (view.points[-1] if view.points else {})
    state = html.escape(view.state or "not loaded")
    head = f'<div class="vname">v{view.version} <span class="vstate">{state}</span></div>'
    if not p:
        return (
            f'<div class="vrow" data-version="{view.version}">{head}'
            '<p class="detail">No evaluation yet: send traffic and wait for the next evaluation.</p></div>'
        )
    chips = (
        _drift_chip(p, view.report),
        _prediction_drift_chip(p),
        _accuracy_chip(p, view.report, floor),
        _estimate_chip(p, view.estimate_note, floor),
        _quality_chip(p),
        _traffic_chip(p),
    )
    top = ", ".join(
        f"{html.escape(str(f['feature']))} ({f['psi']:.2f})" for f in p.get("top_drifted_features") or []
    )
    window = p.get("window_rows")
    details = [f"window {window} rows"] if window is not None else []
    details.append(f"top drifted features (PSI): {top or 'none'}")
    return (
        f'<div class="vrow" data-version="{view.version}">{head}<div class="chips">{"".join(chips)}</div>'
        f'<p class="detail">{" · ".join(details)}</p></div>'
    )


def effective_floor(model: ModelView) -> float:
    """The accuracy floor the page judges a model by: its own, else the alert rules'."""
    return model.accuracy_floor if model.accuracy_floor is not None else DEFAULT_ACCURACY_FLOOR


def render_verdicts(model: ModelView) -> str:
    """A model's verdicts: per version drift, accuracy, estimate, quality and traffic; its labelers
    and retrain runs.

    The status page's script moves this block into the model's card; where there is no card
    (the control plane's own page) it stays above the model's curves.
    """
    rows = "".join(_version_verdicts(v, effective_floor(model)) for v in model.versions)
    if not rows:
        rows = '<p class="detail">No evaluation yet: send traffic and wait for the next evaluation.</p>'
    if model.quarantined:
        why = "; ".join(f"{s}: {', '.join(r) or 'quarantined'}" for s, r in sorted(model.quarantined.items()))
        names = ", ".join(html.escape(s) for s in sorted(model.quarantined))
        labelers = _chip("labelers", "bad", f"quarantined labelers: {names}", why)
    else:
        labelers = _chip("labelers", "ok", "no labeler quarantined")
    runs = ", ".join(f"{model.retrain_runs.get(o, 0)} {o}" for o in RETRAIN_OUTCOMES)
    failed = model.retrain_runs.get("failed", 0)
    retrains = _chip("retrain", "warn" if failed else "idle", f"retrain runs since start: {runs}")
    parts = [
        f'<div class="verdicts" data-model="{html.escape(model.name)}">{rows}',
        f'<div class="chips model-chips">{labelers}{retrains}</div>',
    ]
    if model.retrain_note:
        parts.append(f'<p class="retrain-skipped">{html.escape(model.retrain_note)}</p>')
    if model.error:
        parts.append(
            f'<p class="detail"><strong>History unavailable:</strong> {html.escape(model.error)}</p>'
        )
    parts.append("</div>")
    return "".join(parts)
