"""The feedback route: late labels joined to logged predictions by request id.

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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response

from modelloop.errors import ErrorCode
from modelloop.monitoring.store import FeedbackItem, FeedbackResult, StoreUnavailable
from modelloop.serving.errors import InvalidInput, ModelNotFound, ServingError
from modelloop.serving.rest.errors import error_response, serving_error_response
from modelloop.serving.rest.transport import check_content_type, read_body, valid_request_id

if TYPE_CHECKING:
    from modelloop.monitoring.service import MonitoringService
    from modelloop.serving.settings import ServingSettings

logger = logging.getLogger(__name__)

MAX_FEEDBACK_ITEMS = 10_000
_ITEM_KEYS = frozenset({"request_id", "targets", "target"})


def parse_feedback(body: bytes) -> list[FeedbackItem]:
    """Decodes and checks the shape of a feedback body (targets are checked by the store).

    Args:
        body: The raw JSON body.

    Returns:
        One item per entry, in order.

    Raises:
        InvalidInput: The body is not JSON or not ``{"feedback": [{request_id, targets|target}]}``.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON body: {exc}") from None
    if not isinstance(payload, dict) or set(payload) != {"feedback"}:
        raise InvalidInput('the body must be {"feedback": [{"request_id": "...", "targets": [...]}, ...]}')
    entries = payload["feedback"]
    if not isinstance(entries, list) or not entries:
        raise InvalidInput('"feedback" must be a non-empty list')
    if len(entries) > MAX_FEEDBACK_ITEMS:
        raise InvalidInput(f'"feedback" has {len(entries)} items; at most {MAX_FEEDBACK_ITEMS} per request')
    items: list[FeedbackItem] = []
    for i, entry in enumerate(entries):
        where = f"feedback[{i}]"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where} must be an object with request_id and targets")
        unknown = sorted(set(entry) - _ITEM_KEYS)
        if unknown:
            raise InvalidInput(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")
        rid = entry.get("request_id")
        if not isinstance(rid, str) or not valid_request_id(rid):
            raise InvalidInput(
                f"{where}.request_id must be the request's x-request-id (1..128 printable ASCII)"
            )
        if ("targets" in entry) == ("target" in entry):
            raise InvalidInput(f"{where} needs exactly one of targets (a list) or target (one row)")
        if "targets" in entry:
            targets: Any = entry["targets"]
            if not isinstance(targets, list):
                raise InvalidInput(f"{where}.targets must be a list with one target per row")
        else:
            if isinstance(entry["target"], list | dict):
                raise InvalidInput(f"{where}.target must be a single value; use targets for several rows")
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


def create_monitoring_router(monitoring: MonitoringService | None, settings: ServingSettings) -> APIRouter:
    """The feedback route, bound to the monitoring service.

    Args:
        monitoring: The service; None when monitoring is off (the route then answers 501).
        settings: Server settings (``max_body_bytes``).

    Returns:
        A router to include in the app.
    """
    router = APIRouter(tags=["monitoring"])

    @router.post(
        "/v1/models/{name}/feedback",
        summary="Labels for logged predictions, by request id",
        responses={
            400: {"description": "malformed body or invalid targets"},
            404: {"description": "unknown model or request ids"},
            409: {"description": "already labelled"},
            503: {"description": "feedback store unavailable"},
        },
    )
    async def feedback(name: str, request: Request) -> Response:
        try:
            if monitoring is None:
                raise ServingError(
                    "monitoring is disabled on this server (--no-monitoring): feedback is not stored",
                    ErrorCode.UNIMPLEMENTED,
                )
            if not monitoring.has_model(name):
                raise ModelNotFound(f"model {name!r} is not in the repository")
            check_content_type(request)
            items = parse_feedback(await read_body(request, settings.max_body_bytes))
            result = await monitoring.submit_feedback(name, items)
        except StoreUnavailable as exc:
            logger.error("feedback for %s refused: store unavailable: %s", name, exc.message)
            return error_response(f"feedback store unavailable: {exc.message}", 503)
        except ServingError as exc:
            return serving_error_response(exc)
        status, message = feedback_status(result)
        body = result.as_dict()
        if message:
            body = {"error": message, **body}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    return router
