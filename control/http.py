"""Monitoring's HTTP surface: the feedback route, the alert webhook and the status page's health section.

The composition root mounts these on the REST app through its extension point
(``create_app(routers=..., status_sections=...)``); serving never imports this module.
Errors are raised as :class:`~modelloop.errors.ServiceError` and mapped by the app.

Feedback: late labels joined to logged predictions by request id.

``POST /v1/models/{name}/feedback`` with

```json
{"feedback": [{"request_id": "3f2a...", "targets": [3, 5]},
              {"request_id": "9c1b...", "target": 7}]}
```

``targets`` holds one label per row of the logged request (class ids for classifiers,
numbers for regressors); ``target`` is the short form for a one-row request. The answer
says what happened to each id:

```json
{"accepted": ["3f2a..."], "unknown": [], "duplicate": [], "invalid": {"9c1b...": "expected 2 targets ..."},
 "ambiguous": {}}
```

Each source labels a prediction once (``duplicate`` when it tries again); several sources
may label the same prediction, and each label is kept. An id that answered requests with
different inputs is ``ambiguous``: no label is paired with either input.

Status: 200 when at least one label was accepted. When none was: 400 if any item was
invalid, else 404 if any id was unknown, else 409 (ambiguous ids, or every id already
labelled by this source); the body then also has ``"error"``. A malformed body is 400, an
unknown model 404, and a store that cannot be reached 503
``{"error": "feedback store unavailable: ..."}``: a label is never acknowledged unless it
was committed.

Labelers authenticate with ``Authorization: Bearer <token>`` when labeler tokens are
configured (``MODELLOOP_FEEDBACK_TOKEN[S]``): 401 without a token, 403 with one that is no
labeler's. The token names the labels' source, which the answer repeats with whether
that source is quarantined (its labels are then stored and marked, but the label checks
leave them out): ``{"accepted": [...], ..., "source": "team-a", "quarantined": false}``.
Without tokens feedback is open and its source is ``anonymous``.

``GET /v1/models/{name}/feedback/sources`` reports every source of a model: labels
stored, agreement with the champion's confident predictions, the classes it relabelled
as which, and whether it is quarantined and why.

The alert webhook, ``POST /monitoring/alerts``, is Alertmanager's receiver, which starts
gated retrains. It is an admin route: it needs ``Authorization: Bearer <admin token>``
(401 without or with a wrong one) and is off (403) when no token is configured. A payload
that is not an Alertmanager version 4 notification is answered 400 with the offending
field. Every well-formed notification is answered 200 with one result per alert,
including alerts that change nothing: ``resolved``, ``duplicate``, ``cooldown (N s
left)``, ``unknown model``. Alertmanager retries any non-2xx answer, and retrying an
alert for a model this server does not have can never succeed, so "unknown model" is a
result, not a 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from modelloop.control.retraining.webhook import WebhookError, parse_alertmanager
from modelloop.control.schemas import (
    ALERTS_BODY,
    ALERTS_RESPONSES,
    FEEDBACK_BODY,
    FEEDBACK_RESPONSES,
    HEALTH_RESPONSES,
    HISTORY_RESPONSES,
    SOURCES_RESPONSES,
)
from modelloop.errors import ErrorCode, ServiceError
from modelloop.monitoring.history import history_point
from modelloop.monitoring.page import STYLE, render_health
from modelloop.monitoring.stores.engine import StoreUnavailable
from modelloop.monitoring.stores.records import FeedbackItem, FeedbackResult
from modelloop.monitoring.verdicts import ModelView, VersionView
from modelloop.serving.types import valid_request_id
from modelloop.tokens import TokenMatcher
from modelloop.web import (
    ADMIN_SECURITY,
    check_content_type,
    read_body,
    require_admin,
    require_admin_or_labeler,
    require_labeler,
)

if TYPE_CHECKING:
    from modelloop.control.retraining.webhook import AlertHandler
    from modelloop.control.service import MonitoringService

logger = logging.getLogger(__name__)

MAX_FEEDBACK_ITEMS = 10_000
# Alertmanager sends at most a few hundred alerts per notification; 1 MiB is plenty.
MAX_ALERT_BODY_BYTES = 1024 * 1024
_ITEM_KEYS = frozenset({"request_id", "targets", "target"})


def _invalid(message: str) -> ServiceError:
    return ServiceError(message, ErrorCode.INVALID_ARGUMENT)


def parse_feedback(body: bytes) -> list[FeedbackItem]:
    """Decodes and checks the shape of a feedback body (targets are checked by the store).

    Args:
        body: The raw JSON body.

    Returns:
        One item per entry, in order.

    Raises:
        ServiceError: INVALID_ARGUMENT when the body is not JSON or not
            ``{"feedback": [{request_id, targets|target}]}``.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"malformed JSON body: {exc}") from None
    if not isinstance(payload, dict) or set(payload) != {"feedback"}:
        raise _invalid('the body must be {"feedback": [{"request_id": "...", "targets": [...]}, ...]}')
    entries = payload["feedback"]
    if not isinstance(entries, list) or not entries:
        raise _invalid('"feedback" must be a non-empty list')
    if len(entries) > MAX_FEEDBACK_ITEMS:
        raise _invalid(f'"feedback" has {len(entries)} items; at most {MAX_FEEDBACK_ITEMS} per request')
    items: list[FeedbackItem] = []
    for i, entry in enumerate(entries):
        where = f"feedback[{i}]"
        if not isinstance(entry, dict):
            raise _invalid(f"{where} must be an object with request_id and targets")
        unknown = sorted(set(entry) - _ITEM_KEYS)
        if unknown:
            raise _invalid(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")
        rid = entry.get("request_id")
        if not isinstance(rid, str) or not valid_request_id(rid):
            raise _invalid(f"{where}.request_id must be the request's x-request-id (1..128 printable ASCII)")
        if ("targets" in entry) == ("target" in entry):
            raise _invalid(f"{where} needs exactly one of targets (a list) or target (one row)")
        if "targets" in entry:
            targets: Any = entry["targets"]
            if not isinstance(targets, list):
                raise _invalid(f"{where}.targets must be a list with one target per row")
        else:
            if isinstance(entry["target"], list | dict):
                raise _invalid(f"{where}.target must be a single value; use targets for several rows")
            targets = [entry["target"]]
        items.append(FeedbackItem(rid, targets))
    return items


def feedback_status(result: FeedbackResult) -> tuple[int, str]:
    """The HTTP status of a processed batch, and the error message for a 4xx (else "")."""
    if result.accepted:
        return 200, ""
    if result.invalid:
        return 400, "no label accepted: invalid targets"
    if result.unknown:
        return 404, "no label accepted: unknown request ids (no logged prediction of this model)"
    if result.ambiguous:
        return 409, "no label accepted: ambiguous request ids (each answered requests with different inputs)"
    return 409, "no label accepted: this source already labelled every request id; its first label is kept"


def _monitoring_on(monitoring: MonitoringService | None, name: str) -> MonitoringService:
    if monitoring is None:
        raise ServiceError(
            "monitoring is disabled on this server (--no-monitoring): feedback is not stored",
            ErrorCode.UNIMPLEMENTED,
        )
    if not monitoring.has_model(name):
        raise ServiceError(f"model {name!r} is not in the repository", ErrorCode.NOT_FOUND)
    return monitoring


def create_feedback_router(
    monitoring: MonitoringService | None,
    max_body_bytes: int,
    labelers: TokenMatcher | None = None,
    admin_token: str | None = None,
) -> APIRouter:
    """The feedback routes, bound to the monitoring service.

    Args:
        monitoring: The service; None when monitoring is off (the routes then answer 501).
        max_body_bytes: The body limit.
        labelers: The labelers' tokens; None or empty = feedback is unauthenticated and
            its source is ``anonymous``. Defaults to None.
        admin_token: The admin token, which may read the sources report as the labelers
            may (the report names the labelers). Defaults to None.

    Returns:
        A router to mount on the REST app.
    """
    router = APIRouter(tags=["monitoring"])
    tokens = labelers if labelers is not None else TokenMatcher({})

    @router.post(
        "/v1/models/{name}/feedback",
        summary="Labels for logged predictions, by request id",
        openapi_extra=FEEDBACK_BODY,
        responses=FEEDBACK_RESPONSES,
    )
    async def feedback(name: str, request: Request) -> Response:
        # Authentication first: an unauthenticated caller learns nothing, not even which
        # models exist.
        source = require_labeler(request, tokens)
        service = _monitoring_on(monitoring, name)
        check_content_type(request)
        items = parse_feedback(await read_body(request, max_body_bytes))
        try:
            result = await service.submit_feedback(name, items, source)
        except StoreUnavailable as exc:
            logger.error("feedback for %s refused: store unavailable: %s", name, exc.message)
            raise ServiceError(f"feedback store unavailable: {exc.message}", ErrorCode.UNAVAILABLE) from exc
        status, message = feedback_status(result)
        body = result.as_dict()
        if message:
            body = {"error": message, **body}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    @router.get(
        "/v1/models/{name}/feedback/sources",
        summary="Labeler sources of a model: labels, agreement, confusion, quarantine",
        responses=SOURCES_RESPONSES,
    )
    async def sources(name: str, request: Request) -> Response:
        # The report names the labelers: only the admin and the labelers may read it.
        require_admin_or_labeler(request, admin_token, tokens)
        service = _monitoring_on(monitoring, name)
        try:
            report = await asyncio.to_thread(service.source_report, name)
        except StoreUnavailable as exc:
            raise ServiceError(f"feedback store unavailable: {exc.message}", ErrorCode.UNAVAILABLE) from exc
        return Response(orjson.dumps(report), media_type="application/json")

    return router


def create_alerts_router(
    handler: AlertHandler | None, admin_token: str | None, max_body_bytes: int
) -> APIRouter:
    """The alert webhook route.

    Args:
        handler: Applies the retrain policy and starts the trigger; None = retraining
            is off, and the route answers 503.
        admin_token: The admin bearer token; None turns the route off (403).
        max_body_bytes: The server's body limit (the route takes at most 1 MiB).

    Returns:
        A router to mount on the REST app.
    """
    router = APIRouter(tags=["monitoring"])

    @router.post(
        "/monitoring/alerts",
        summary="Alertmanager webhook (admin): starts gated retrains",
        openapi_extra={**ALERTS_BODY, **ADMIN_SECURITY},
        responses=ALERTS_RESPONSES,
    )
    async def alerts(request: Request) -> Response:
        require_admin(request, admin_token)
        if handler is None:
            raise ServiceError(
                "retraining is off on this server (monitoring disabled)", ErrorCode.UNAVAILABLE
            )
        check_content_type(request)
        body = await read_body(request, min(max_body_bytes, MAX_ALERT_BODY_BYTES))
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"alert payload is not JSON: {exc}") from None
        try:
            parsed = parse_alertmanager(payload)
        except WebhookError as exc:
            raise _invalid(f"not an Alertmanager webhook payload: {exc}") from None
        results = await handler.handle(parsed)
        return Response(
            orjson.dumps({"alerts": [r.as_dict() for r in results]}), media_type="application/json"
        )

    return router


# -- history and the live health page ----------------------------------------------------

HISTORY_DEFAULT_LIMIT = 1000
HISTORY_MAX_LIMIT = 10_000
HEALTH_DEFAULT_MINUTES = 30
HEALTH_MAX_MINUTES = 24 * 60
# Seconds between two refreshes of the health section in the browser.
HEALTH_REFRESH_S = 5


def _query_number(
    request: Request, name: str, default: float, *, low: float, high: float, integer: bool
) -> float:
    """One numeric query parameter, or a 400 that names it and says what it must be."""
    text = request.query_params.get(name)
    if text is None:
        return default
    kind = "an integer" if integer else "a number"
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise _invalid(
            f"query parameter {name!r} must be {kind} in {low:g}..{high:g}, got {text[:40]!r}"
        ) from None
    if not (low <= value <= high):  # NaN fails this too
        raise _invalid(f"query parameter {name!r} must be {kind} in {low:g}..{high:g}, got {text[:40]!r}")
    return value


def create_health_router(monitoring: MonitoringService | None) -> APIRouter:
    """The history route and the health fragment the status page refreshes itself with.

    ``GET /monitoring/models/{model}/history?since=UNIX_SECONDS&limit=N`` answers
    ``{"model": ..., "since": ..., "series": [{"version": 1, "points": [{"t": ..., "accuracy":
    ..., "estimated_accuracy": ..., "drift_share": ..., ...}]}]}``: every version's points at
    or after ``since`` (default 0: everything retained), at most ``limit`` per version (the
    newest; default 1000). ``GET /monitoring/health?minutes=N`` answers the HTML fragment of
    the live health section (the last ``N`` minutes, default 30).

    Args:
        monitoring: The service; None when monitoring is off (both routes answer 501).

    Returns:
        A router to mount on the REST app.
    """
    router = APIRouter(tags=["monitoring"])

    def service() -> MonitoringService:
        if monitoring is None:
            raise ServiceError(
                "monitoring is disabled on this server (--no-monitoring): no history is kept",
                ErrorCode.UNIMPLEMENTED,
            )
        return monitoring

    @router.get(
        "/monitoring/models/{name}/history",
        summary="Per-evaluation history of a model's versions",
        responses=HISTORY_RESPONSES,
    )
    async def history(name: str, request: Request) -> Response:
        svc = service()
        if not svc.has_model(name):
            raise ServiceError(f"model {name!r} is not in the repository", ErrorCode.NOT_FOUND)
        since = _query_number(request, "since", 0.0, low=0.0, high=1e11, integer=False)
        limit = int(
            _query_number(
                request, "limit", HISTORY_DEFAULT_LIMIT, low=1, high=HISTORY_MAX_LIMIT, integer=True
            )
        )
        try:
            found = await asyncio.to_thread(svc.history, name, since=since, limit=limit)
        except StoreUnavailable as exc:
            raise ServiceError(f"history store unavailable: {exc.message}", ErrorCode.UNAVAILABLE) from exc
        body = {
            "model": name,
            "since": since,
            "series": [{"version": v, "points": points} for v, points in sorted(found.items())],
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @router.get(
        "/monitoring/health",
        summary="The live health section of the status page (HTML)",
        response_class=HTMLResponse,
        responses=HEALTH_RESPONSES,
    )
    async def health(request: Request) -> Response:
        svc = service()
        minutes = _query_number(
            request, "minutes", HEALTH_DEFAULT_MINUTES, low=1, high=HEALTH_MAX_MINUTES, integer=True
        )
        fragment = await asyncio.to_thread(render_health_fragment, svc, minutes * 60.0)
        return Response(
            fragment, media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"}
        )

    return router


def render_health_fragment(monitoring: MonitoringService, seconds: float, now: float | None = None) -> str:
    """The health fragment of every model over the last ``seconds`` (blocking: reads the store).

    Args:
        monitoring: The service.
        seconds: Length of the time axis.
        now: End of the axis (Unix time). Defaults to the current time.

    Returns:
        The HTML fragment.
    """
    t1 = time.time() if now is None else now
    t0 = t1 - seconds
    # Enough points to draw every evaluation of the span at one a second; the newest win.
    limit = int(min(HISTORY_MAX_LIMIT, max(seconds, 60)))
    first_seen = t1
    views = []
    for name in monitoring.catalog.model_names():
        try:
            states = {s.version: s.state.value for s in monitoring.catalog.statuses(name)}
        except ServiceError:
            continue
        error = ""
        try:
            found = monitoring.history(name, since=t0, limit=limit)
        except StoreUnavailable as exc:
            found, error = {}, exc.message
        reports = monitoring.status(name)
        floor = next((r.settings.accuracy_floor for r in reports.values()), None)
        versions = sorted(set(found) | set(reports) | {v for v, s in states.items() if s == "AVAILABLE"})
        earliest = min((points[0]["t"] for points in found.values() if points), default=t1)
        first_seen = min(first_seen, earliest)
        views.append(
            ModelView(
                name=name,
                versions=[
                    VersionView(
                        version=v,
                        state=states.get(v, ""),
                        points=found.get(v, []),
                        latest=history_point(reports[v], reports[v].traffic).as_dict()
                        if v in reports
                        else None,
                        histograms=reports[v].histograms if v in reports else (),
                        estimate_note=reports[v].estimate_note if v in reports else "",
                        report=reports.get(v),
                    )
                    for v in versions
                ],
                retrain_runs=monitoring.retrain_runs(name),
                accuracy_floor=floor,
                error=error,
                retrain_note=_retrain_note(monitoring, name),
                quarantined=monitoring.quarantine_reasons(name),
            )
        )
    # The axis starts at the oldest point shown (a young server's curves fill the width),
    # and spans at least a minute.
    return render_health(views, t0=max(t0, min(first_seen, t1 - 60.0)), t1=t1)


def _retrain_note(monitoring: MonitoringService, model: str) -> str:
    """Why the last drift alert of a model started no retrain, for the page ("" when none did)."""
    gate = monitoring.retrain_gate
    skip = gate.skipped.get(model) if gate is not None else None
    if skip is None:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(skip.at))
    return f"{skip.reason} at {when} started no retrain: {skip.why}."


class HealthSection:
    """The live health section of the status page: verdicts and curves that refresh without a reload.

    The page at ``/`` renders this placeholder; its script fetches ``/monitoring/health`` at
    once and every 5 seconds and swaps the fragment in, refreshes the model cards (``#models``)
    from the page itself, then moves each model's verdicts from the fragment into the slot of
    its card, so the cards hold the verdicts and the section below them the curves. Where no
    card has the model (the control plane's own page) the verdicts stay above its curves.
    Everything comes from this server.

    Args:
        monitoring: The service; None when monitoring is off (the section says so).
        forwarded: The server forwards ``/monitoring/health`` to its control plane: the
            charts come from there through this server, with no service here. Defaults
            to False.
    """

    def __init__(self, monitoring: MonitoringService | None, *, forwarded: bool = False) -> None:
        self._monitoring = monitoring
        self._forwarded = forwarded

    def html(self) -> str:
        """The section's HTML: styles, a placeholder and the refresh script."""
        if self._monitoring is None and not self._forwarded:
            return (
                '<section id="health"><p>Monitoring is off: no verdicts and no health charts.</p></section>'
            )
        return f"""<style>{STYLE}</style>
<section id="health" aria-live="polite"><p>Loading the verdicts and the health charts…
<noscript>This page needs JavaScript to refresh; the verdicts and charts are at
<a href="/monitoring/health">/monitoring/health</a>.</noscript></p></section>
<script>
(() => {{
  const minutes = new URLSearchParams(location.search).get("minutes") || "{HEALTH_DEFAULT_MINUTES}";
  let refreshes = 0;
  function placeVerdicts(blocks) {{
    const cards = document.querySelectorAll("#models .model-card");
    for (const block of blocks) {{
      for (const card of cards) {{
        const slot = card.querySelector('[data-slot="verdicts"]');
        if (!slot || card.dataset.model !== block.dataset.model) continue;
        slot.replaceChildren(block);
        // The card lists these versions with their states already.
        for (const row of block.querySelectorAll(".vrow[data-version]")) {{
          const listed = card.querySelector(`.versions li[data-version="${{row.dataset.version}}"]`);
          row.classList.toggle("listed", listed !== null);
        }}
      }}
    }}
  }}
  async function refresh() {{
    try {{
      const url = "/monitoring/health?minutes=" + encodeURIComponent(minutes);
      const [part, page] = await Promise.all([
        fetch(url, {{cache: "no-store"}}),
        fetch(location.pathname + location.search, {{cache: "no-store"}}),
      ]);
      const fragment = part.ok ? await part.text() : null;
      const fresh = page.ok
        ? new DOMParser().parseFromString(await page.text(), "text/html").getElementById("models")
        : null;
      const shown = document.getElementById("models");
      // The verdicts shown now stay until the next fragment brings new ones.
      const held = shown ? [...shown.querySelectorAll(".verdicts[data-model]")] : [];
      if (fresh && shown) shown.replaceWith(fresh);
      const health = document.getElementById("health");
      if (fragment !== null) {{
        health.innerHTML = fragment;
        document.body.dataset.refreshes = String(++refreshes);
      }}
      placeVerdicts(fragment !== null ? [...health.querySelectorAll(".verdicts[data-model]")] : held);
    }} catch (err) {{
      // The server is restarting or unreachable: keep what is shown, try again at the next tick.
    }}
    setTimeout(refresh, {HEALTH_REFRESH_S * 1000});
  }}
  refresh();
}})();
</script>"""
