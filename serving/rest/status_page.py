"""The status page at ``/``: one card per model, then the sections other packages add.

Each card shows the model's state at a glance (a coloured pill with a word, never colour
alone), its versions with their states and links, and what the card parts add (the
rollout in progress). An empty ``data-slot="verdicts"`` waits for monitoring's verdicts:
the health section's script moves each model's verdicts from its fragment into the card
(:mod:`modelloop.control.http` ``HealthSection``), so every fact is shown once. The
sections below the cards (monitoring's curves, the control plane's link) follow.

Everything is inline (styles, no images, no fonts, no scripts of its own): the page loads
nothing from elsewhere. It is laid out for a laptop and a phone alike (a viewport meta,
cards in a grid that becomes one column on a narrow screen).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from modelloop.errors import ServiceError
from modelloop.serving.types import ModelState, VersionStatus

if TYPE_CHECKING:
    from modelloop.serving.dataplane import DataPlane

TITLE = "modelloop"

# Verdict classes, shared by every part of the page: ok, warn, bad, idle (nothing to judge yet).
_STATE_VERDICTS = {
    ModelState.AVAILABLE: "ok",
    ModelState.UNLOADED: "idle",
    ModelState.START: "warn",
    ModelState.LOADING: "warn",
    ModelState.UNLOADING: "warn",
    ModelState.END: "idle",
    ModelState.FAILED: "bad",
}

STYLE = (
    ":root{--ok:#1e7b34;--ok-bg:#e3f4e7;--warn:#8a5a00;--warn-bg:#fdf1d6;--bad:#b3261e;--bad-bg:#fde4e1;"
    "--idle:#555;--idle-bg:#eceff3;--line:#d8dde4;--ink:#1d2330;--muted:#5b6472;--page:#f5f7fa}"
    "*{box-sizing:border-box}"
    "body{margin:0;font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:var(--ink);"
    "background:var(--page);overflow-wrap:anywhere}"
    "a{color:#1b4f9c}"
    ".top{display:flex;flex-wrap:wrap;align-items:center;gap:.5rem 1rem;padding:.75rem 1rem;"
    "background:#fff;border-bottom:1px solid var(--line)}"
    ".top h1{font-size:1.25rem;margin:0}.top nav{margin-left:auto;display:flex;gap:1rem}"
    "main{max-width:1400px;margin:0 auto;padding:1rem}"
    "#models{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(min(100%,24rem),1fr));"
    "margin-bottom:1.5rem}"
    ".card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:.9rem 1rem;"
    "box-shadow:0 1px 2px rgba(0,0,0,.04);min-width:0}"
    ".card-head{display:flex;align-items:center;gap:.6rem;flex-wrap:wrap;margin-bottom:.5rem}"
    ".card-head h2{font-size:1.15rem;margin:0}"
    ".pill{display:inline-block;border-radius:999px;padding:.05rem .6rem;font-size:.8rem;font-weight:600;"
    "border:1px solid currentColor}"
    ".ok{color:var(--ok);background:var(--ok-bg)}.warn{color:var(--warn);background:var(--warn-bg)}"
    ".bad{color:var(--bad);background:var(--bad-bg)}.idle{color:var(--idle);background:var(--idle-bg)}"
    ".versions{list-style:none;margin:0 0 .5rem;padding:0;display:flex;flex-wrap:wrap;gap:.4rem}"
    ".versions li{display:flex;align-items:center;gap:.35rem;border:1px solid var(--line);"
    "border-radius:8px;padding:.15rem .5rem;font-size:.9rem}"
    ".versions .why{color:var(--muted);font-size:.8rem}"
    ".part{margin:.4rem 0;font-size:.9rem}.part h3{font-size:.8rem;text-transform:uppercase;"
    "letter-spacing:.04em;color:var(--muted);margin:.6rem 0 .2rem}"
    ".empty{color:var(--muted)}"
    "@media (max-width:600px){body{font-size:14px}main{padding:.6rem}.top nav{margin-left:0}}"
)
"""The page's own styles (inline: the page loads nothing from elsewhere)."""


class StatusCardPart(Protocol):
    """A part of each model's card on the status page (the rollout in progress)."""

    def html(self, model: str) -> str:
        """The part's HTML for one model, or "" for none; the implementer escapes what it shows."""
        ...


class StatusSection(Protocol):
    """A section of the status page below the cards (monitoring's health curves)."""

    def html(self) -> str:
        """The section's HTML; the implementer escapes what it shows."""
        ...


def model_verdict(statuses: Sequence[VersionStatus]) -> tuple[str, str]:
    """A model's state in one word and its verdict class, from its versions' states.

    Returns:
        ``(text, verdict)``: "serving v2" (ok) when a version is AVAILABLE, else the state
        of the newest version (FAILED is bad, LOADING a warning), or "no versions" (idle).
    """
    available = [s.version for s in statuses if s.state is ModelState.AVAILABLE]
    if available:
        shown = ", ".join(f"v{v}" for v in sorted(available))
        return f"serving {shown}", "ok"
    if not statuses:
        return "no versions", "idle"
    newest = max(statuses, key=lambda s: s.version)
    return f"v{newest.version} {newest.state.value}", _STATE_VERDICTS.get(newest.state, "idle")


def _version_item(name: str, status: VersionStatus) -> str:
    link = f"/v1/models/{html.escape(name)}/versions/{status.version}"
    verdict = _STATE_VERDICTS.get(status.state, "idle")
    why = f' <span class="why">{html.escape(status.error_message)}</span>' if status.error_message else ""
    return (
        f'<li data-version="{status.version}"><a href="{link}">v{status.version}</a> '
        f'<span class="pill {verdict}">{status.state.value}</span>{why}</li>'
    )


def render_card(dataplane: DataPlane, name: str, parts: Sequence[StatusCardPart] = ()) -> str:
    """One model's card: its state, its versions, the parts' additions and the verdicts' slot.

    Args:
        dataplane: The data plane to describe.
        name: The model.
        parts: What other packages add to each card. Defaults to none.

    Returns:
        The ``<article>``; every value from a model or a client is escaped.
    """
    shown = html.escape(name)
    try:
        statuses = dataplane.model_status(name)
    except ServiceError as error:
        head, verdict = "unavailable", "bad"
        body = f'<p class="why">{html.escape(error.message)}</p>'
    else:
        head, verdict = model_verdict(statuses)
        items = "".join(_version_item(name, s) for s in statuses)
        body = f'<ul class="versions">{items}</ul>' if items else '<p class="empty">No versions.</p>'
    extra = "".join(part.html(name) for part in parts)
    return (
        f'<article class="card model-card" data-model="{shown}">'
        f'<header class="card-head"><h2>{shown}</h2>'
        f'<span class="pill {verdict}" data-verdict="state">{html.escape(head)}</span></header>'
        f'{body}{extra}<div class="slot" data-slot="verdicts"></div></article>'
    )


def render_status_page(
    dataplane: DataPlane, parts: Sequence[StatusCardPart] = (), sections: Sequence[StatusSection] = ()
) -> str:
    """The whole page: readiness, a card per model, then the sections.

    Args:
        dataplane: The data plane to describe.
        parts: Parts of each model's card (the rollout's). Defaults to none.
        sections: Sections below the cards (monitoring's). Defaults to none.

    Returns:
        The HTML document; every value from a model or a client is escaped.
    """
    cards = "".join(render_card(dataplane, name, parts) for name in dataplane.model_names())
    if not cards:
        cards = '<p class="empty">No models in the repository.</p>'
    ready, verdict = ("ready", "ok") if dataplane.ready() else ("not ready", "bad")
    repository = dataplane.repository_error()
    problem = f'<span class="pill bad">repository: {html.escape(repository)}</span>' if repository else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{TITLE}</title>
<link rel="icon" href="data:,"><style>{STYLE}</style></head>
<body>
<header class="top"><h1>{TITLE}</h1>
<span class="pill {verdict}" id="readiness">Server <strong>{ready}</strong></span>{problem}
<nav><a href="/docs">API docs</a><a href="/metrics">metrics</a></nav></header>
<main>
<section id="models" aria-label="models">{cards}</section>
{"".join(section.html() for section in sections)}
</main>
</body></html>
"""
