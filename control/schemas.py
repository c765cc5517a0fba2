"""OpenAPI documentation of monitoring's routes: the feedback body and Alertmanager's webhook.

Like serving's (``serving/rest/schemas.py``), these models describe the bodies in
``/docs`` and ``/openapi.json`` and the schema tests check the answers against them; the
routes keep decoding with their own checks (:func:`~modelloop.control.http.parse_feedback`,
:func:`~modelloop.control.retraining.webhook.parse_alertmanager`), whose messages name the field at
fault.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from modelloop.web import error_responses, openapi_body, schema_ref


class MonitoringError(BaseModel):
    """An error of a monitoring route."""

    error: str = Field(description="What went wrong.")


class FeedbackItem(BaseModel):
    """Labels for one logged prediction: ``targets`` (one per row) or ``target`` (one row)."""

    request_id: str = Field(
        min_length=1, max_length=128, description="The prediction's x-request-id (printable ASCII)."
    )
    targets: list[Any] | None = Field(
        None, description="One label per row of the logged request: class ids, or numbers for regressors."
    )
    target: float | int | str | bool | None = Field(None, description="The label of a one-row request.")


class FeedbackRequest(BaseModel):
    """Late labels, joined to logged predictions by request id."""

    feedback: list[FeedbackItem] = Field(min_length=1, max_length=10_000)


class FeedbackResponse(BaseModel):
    """What happened to each request id; ``error`` is there when no label was accepted."""

    error: str | None = Field(None, description="Why no label was accepted (4xx only).")
    accepted: list[str] = Field(description="Stored: the ids whose labels now count.")
    unknown: list[str] = Field(description="No logged prediction of this model has this id.")
    duplicate: list[str] = Field(description="Already labelled by this source; its first label is kept.")
    invalid: dict[str, str] = Field(description="Id to the reason its targets were refused.")
    ambiguous: dict[str, str] = Field(
        default_factory=dict,
        description="Id to why its labels were refused: the id answered requests with different inputs.",
    )
    source: str = Field(description="The labeler the token belongs to (``anonymous`` without tokens).")
    quarantined: bool = Field(
        description="The source is quarantined: its labels are stored and marked, not used."
    )


class AlertmanagerAlert(BaseModel):
    """One alert of an Alertmanager notification."""

    status: str = Field(description='"firing" or "resolved".')
    labels: dict[str, str] = Field(
        description="Must hold alertname; model and action=retrain start retrains."
    )
    annotations: dict[str, str] | None = None
    startsAt: str = Field(description="RFC 3339; with the group key, what de-duplicates.")
    endsAt: str | None = None
    generatorURL: str | None = None
    fingerprint: str | None = None


class AlertmanagerWebhook(BaseModel):
    """Alertmanager's webhook payload, version 4."""

    version: str = Field(description='Must be "4".')
    groupKey: str
    status: str = Field(description='"firing" or "resolved".')
    alerts: list[AlertmanagerAlert]
    receiver: str | None = None
    groupLabels: dict[str, str] | None = None
    commonLabels: dict[str, str] | None = None
    commonAnnotations: dict[str, str] | None = None
    externalURL: str | None = None
    truncatedAlerts: int | None = None


class AlertResult(BaseModel):
    """What the server did with one alert."""

    alertname: str
    model: str | None
    result: str = Field(
        description="started, resolved, duplicate, cooldown (N s left), not a retrain alert, "
        "no model label, unknown model, or trigger failed: <why>."
    )


class AlertsResponse(BaseModel):
    """One result per alert of the notification."""

    alerts: list[AlertResult]


FEEDBACK_BODY = openapi_body(
    [FeedbackRequest],
    description="Labels for predictions, by their x-request-id.",
    path_examples={"name": "digits"},
    examples={
        "rows": {
            "summary": "A two-row prediction and a one-row prediction",
            "value": {
                "feedback": [
                    {"request_id": "<x-request-id of a 2-row prediction>", "targets": [3, 5]},
                    {"request_id": "<x-request-id of a 1-row prediction>", "target": 0},
                ]
            },
        }
    },
)
# A 400 or 404 is either a refused batch (with the per-id answer) or a plain error.
_BATCH_OR_ERROR = {
    "application/json": {"schema": {"anyOf": [schema_ref(FeedbackResponse), schema_ref(MonitoringError)]}}
}
FEEDBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": FeedbackResponse, "description": "At least one label was accepted"},
    400: {"description": "Malformed body, or no label accepted: invalid targets", "content": _BATCH_OR_ERROR},
    404: {"description": "Unknown model, or no label accepted: unknown ids", "content": _BATCH_OR_ERROR},
    409: {"model": FeedbackResponse, "description": "No label accepted: every id was already labelled"},
    **error_responses(
        MonitoringError,
        401,
        403,
        413,
        415,
        501,
        503,
        s401="Labeler tokens are configured and the request has none",
        s403="The bearer token is not a labeler token",
        s501="Monitoring is off on this server",
    ),
}

ALERTS_BODY = openapi_body(
    [AlertmanagerWebhook],
    description="The notification Alertmanager's webhook receiver sends (payload version 4).",
    examples={
        "drift": {
            "summary": "A firing drift alert for digits",
            "value": {
                "version": "4",
                "groupKey": '{}/{action="retrain"}:{alertname="ModelDriftDetected", model="digits"}',
                "status": "firing",
                "receiver": "modelloop-retrain",
                "alerts": [
                    {
                        "status": "firing",
                        "labels": {"alertname": "ModelDriftDetected", "model": "digits", "action": "retrain"},
                        "startsAt": "2026-01-12T10:15:30.123Z",
                    }
                ],
            },
        }
    },
)
ALERTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": AlertsResponse, "description": "One result per alert"},
    **error_responses(
        MonitoringError,
        400,
        401,
        403,
        413,
        415,
        503,
        s400="Not an Alertmanager version 4 payload",
        s401="Missing or wrong bearer token",
        s403="Admin routes are disabled (no MODELLOOP_ADMIN_TOKEN)",
        s503="Retraining is off on this server",
    ),
}


def _json_object(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


SOURCES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _json_object(
        "Per labeler source: labels, agreement with confident predictions, relabels, quarantine"
    ),
    **error_responses(
        MonitoringError,
        401,
        403,
        404,
        501,
        503,
        s401="No bearer token, while an admin or labeler token is configured",
        s403="The token is neither the admin's nor a labeler's",
        s501="Monitoring is off on this server",
    ),
}

HISTORY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _json_object("One point per evaluation and version, oldest first (query: since, limit)"),
    **error_responses(
        MonitoringError,
        400,
        404,
        501,
        503,
        s400="Bad since or limit",
        s501="Monitoring is off on this server",
    ),
}

HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The live health section of the status page (query: minutes)",
        "content": {"text/html": {"schema": {"type": "string"}}},
    },
    **error_responses(
        MonitoringError, 400, 501, 503, s400="Bad minutes", s501="Monitoring is off on this server"
    ),
}


ROLLOUT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _json_object(
        "Champion, candidate, mode, step, share, per-version guardrails, state, reason and history"
    ),
    **error_responses(
        MonitoringError,
        404,
        503,
        s404="Unknown model, no rollout in progress or on record, or monitoring is off",
        s503="The monitoring store is unavailable, or the rollout kept changing",
    ),
}

ROLLOUT_ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _json_object("The rollout after the action (as GET /monitoring/rollouts/{model})"),
    **error_responses(
        MonitoringError,
        400,
        401,
        403,
        404,
        503,
        s400="The action does not apply to the rollout's state (e.g. promoting a promoted rollout)",
        s401="Missing or wrong bearer token",
        s403="Admin routes are disabled (no MODELLOOP_ADMIN_TOKEN)",
        s404="Unknown action or model, no rollout, or monitoring is off",
        s503="The monitoring store is unavailable, or the rollout kept changing",
    ),
}

ROLLOUT_CLEAR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _json_object(
        "The state was forgotten: `{model, cleared, retired_released, previous}`, where "
        "`retired_released` lists the RETIRED versions no longer kept out and `previous` the "
        "rollout as GET /monitoring/rollouts/{model} showed it"
    ),
    **error_responses(
        MonitoringError,
        401,
        403,
        404,
        503,
        s401="Missing or wrong bearer token",
        s403="Admin routes are disabled (no MODELLOOP_ADMIN_TOKEN)",
        s404="The model has no rollout state, or monitoring is off",
        s503="The monitoring store is unavailable",
    ),
}
