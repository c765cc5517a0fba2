"""Monitoring's HTTP surface: the feedback route, the alert webhook and the status-page columns.

The composition root mounts these on the REST app through its extension point
(``create_app(routers=..., status_columns=...)``); serving never imports this module.
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
{"accepted": ["3f2a..."], "unknown": [], "duplicate": [], "invalid": {"9c1b...": "expected 2 targets ..."}}
```

Status: 200 when at least one label was accepted. When none was: 400 if any item was
invalid, else 404 if any id was unknown, else 409 (every id was already labelled); the
body then also has ``"error"``. A malformed body is 400, an unknown model 404, and a store
that cannot be reached 503 ``{"error": "feedback store unavailable: ..."}``: a label is
never acknowledged unless it was committed.

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

import html
import logging
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response

from modelloop.errors import ErrorCode, ServiceError
from modelloop.monitoring.schemas import ALERTS_BODY, ALERTS_RESPONSES, FEEDBACK_BODY, FEEDBACK_RESPONSES
from modelloop.monitoring.store import FeedbackItem, FeedbackResult, StoreUnavailable
from modelloop.monitoring.webhook import WebhookError, parse_alertmanager
from modelloop.serving.types import valid_request_id
from modelloop.web import ADMIN_SECURITY, check_content_type, read_body, require_admin

if TYPE_CHECKING:
    from modelloop.monitoring.service import EvaluationReport, MonitoringService
    from modelloop.monitoring.webhook import AlertHandler

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
    return 409, "no label accepted: every request id is already labelled; the first label is kept"


def create_feedback_router(monitoring: MonitoringService | None, max_body_bytes: int) -> APIRouter:
    """The feedback route, bound to the monitoring service.

    Args:
        monitoring: The service; None when monitoring is off (the route then answers 501).
        max_body_bytes: The body limit.

    Returns:
        A router to mount on the REST app.
    """
    router = APIRouter(tags=["monitoring"])

    @router.post(
        "/v1/models/{name}/feedback",
        summary="Labels for logged predictions, by request id",
        openapi_extra=FEEDBACK_BODY,
        responses=FEEDBACK_RESPONSES,
    )
    async def feedback(name: str, request: Request) -> Response:
        if monitoring is None:
            raise ServiceError(
                "monitoring is disabled on this server (--no-monitoring): feedback is not stored",
                ErrorCode.UNIMPLEMENTED,
            )
        if not monitoring.has_model(name):
            raise ServiceError(f"model {name!r} is not in the repository", ErrorCode.NOT_FOUND)
        check_content_type(request)
        items = parse_feedback(await read_body(request, max_body_bytes))
        try:
            result = await monitoring.submit_feedback(name, items)
        except StoreUnavailable as exc:
            logger.error("feedback for %s refused: store unavailable: %s", name, exc.message)
            raise ServiceError(f"feedback store unavailable: {exc.message}", ErrorCode.UNAVAILABLE) from exc
        status, message = feedback_status(result)
        body = result.as_dict()
        if message:
            body = {"error": message, **body}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

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


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


class MonitoringColumns:
    """The status page's monitoring columns: window, drift, share, top features, prediction drift, accuracy.

    Args:
        monitoring: Where drift and accuracy come from; None when monitoring is off (every
            cell says "off").
    """

    headers = (
        "window",
        "drift detected",
        "share drifted",
        "top drifted features (PSI)",
        "prediction drift (PSI)",
        "accuracy",
    )

    def __init__(self, monitoring: MonitoringService | None) -> None:
        self._monitoring = monitoring

    def cells(self, model: str, version: int) -> list[str]:
        """The HTML cells of one version; every value from a model or a client is escaped."""
        if self._monitoring is None:
            return ["off"] * len(self.headers)
        return _report_cells(self._monitoring.status(model).get(version))


def _report_cells(report: EvaluationReport | None) -> list[str]:
    if report is None:
        return ["–"] * len(MonitoringColumns.headers)
    window = f"{report.window_rows} rows"
    drift = report.drift
    if drift is None:
        reason = report.drift_error or f"collecting ({report.window_rows}/{report.min_rows} rows)"
        cells = [window, html.escape(reason), "–", "–", "–"]
    else:
        top = [f for f in drift.top(3) if f.drifted]
        features = ", ".join(f"{html.escape(f.name)} ({f.psi:.2f})" for f in top) or "none"
        verdict = "<strong>DRIFT</strong>" if drift.drifted else "no"
        share = f"{drift.share:.0%} ({drift.n_drifted}/{len(drift.features)})"
        cells = [window, verdict, share, features, _fmt(drift.prediction_psi)]
    acc = report.accuracy
    labels = "?" if report.labels is None else str(report.labels)
    if report.store_error:
        cells.append(f"store unavailable: {html.escape(report.store_error)}")
    elif acc is None or acc.value is None:
        cells.append(f"no labels ({labels})")
    else:
        shown = f"{acc.metric} {acc.value:.3f}" + ("" if acc.ready else " (too few labels)")
        cells.append(f"{shown}, {acc.rows} in window, {labels} labels")
    return cells
