"""``POST /monitoring/alerts``: Alertmanager's webhook, which starts gated retrains.

An admin route: it needs ``Authorization: Bearer <admin token>`` (401 without or with a
wrong one) and is off (403) when no token is configured. A payload that is not an
Alertmanager version 4 notification is answered 400 with the offending field.

Every well-formed notification is answered 200 with one result per alert, including
alerts that change nothing: ``resolved``, ``duplicate``, ``cooldown (N s left)``,
``unknown model``. Alertmanager retries any non-2xx answer, and retrying an alert for a
model this server does not have can never succeed, so "unknown model" is a result, not
a 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter, Request, Response

from modelloop.errors import ErrorCode
from modelloop.monitoring.webhook import WebhookError, parse_alertmanager
from modelloop.serving.errors import InvalidInput, ServingError
from modelloop.serving.rest.auth import require_admin
from modelloop.serving.rest.transport import check_content_type, read_body

if TYPE_CHECKING:
    from modelloop.monitoring.webhook import AlertHandler
    from modelloop.serving.settings import ServingSettings

# Alertmanager sends at most a few hundred alerts per notification; 1 MiB is plenty.
MAX_ALERT_BODY_BYTES = 1024 * 1024


def create_alerts_router(settings: ServingSettings, handler: AlertHandler | None) -> APIRouter:
    """The alert webhook route.

    Args:
        settings: Server settings (``admin_token``).
        handler: Applies the retrain policy and starts the trigger; None = retraining
            is off, and the route answers 503.

    Returns:
        A router to include in the app.
    """
    router = APIRouter(tags=["monitoring"])

    @router.post(
        "/monitoring/alerts",
        summary="Alertmanager webhook (admin): starts gated retrains",
        responses={
            200: {"description": "One result per alert"},
            400: {"description": "Not an Alertmanager version 4 payload"},
            401: {"description": "Missing or wrong bearer token"},
            403: {"description": "Admin routes are disabled (no MODELLOOP_ADMIN_TOKEN)"},
        },
    )
    async def alerts(request: Request) -> Response:
        require_admin(request, settings)
        if handler is None:
            raise ServingError(
                "retraining is off on this server (monitoring disabled)", ErrorCode.UNAVAILABLE
            )
        check_content_type(request)
        body = await read_body(request, min(settings.max_body_bytes, MAX_ALERT_BODY_BYTES))
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"alert payload is not JSON: {exc}") from None
        try:
            parsed = parse_alertmanager(payload)
        except WebhookError as exc:
            raise InvalidInput(f"not an Alertmanager webhook payload: {exc}") from None
        results = await handler.handle(parsed)
        return Response(
            orjson.dumps({"alerts": [r.as_dict() for r in results]}), media_type="application/json"
        )

    return router
