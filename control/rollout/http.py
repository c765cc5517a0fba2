"""The rollout routes and the rollout part of the status page's model cards.

- ``GET /monitoring/rollouts/{model}``: champion, candidate, mode, step, share, the
  per-version guardrail values, state, reason and history (404 with a reason for an unknown
  model or one with no rollout).
- ``POST /monitoring/rollouts/{model}/{promote|rollback|pause}`` (admin token): promote
  advances one step (from shadow to the first canary step; after the last step the
  candidate becomes the champion; a rolled-back candidate is restored as a new canary),
  rollback retires the candidate now, pause stops automatic promotion (a breach still rolls
  back). An action that does not apply to the rollout's state is a 400 that says why.
- ``POST /monitoring/rollouts/{model}/clear`` (admin token): forgets the model's rollout
  state, RETIRED versions included (state left by another repository, or a rollback an
  operator wants undone); the registry then loads what the version policy wants.
"""

from __future__ import annotations

import asyncio
import html
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from modelloop.control.rollout.controller import RolloutController
from modelloop.control.rollout.state import ACTIONS, current_share
from modelloop.control.schemas import (
    ROLLOUT_ACTION_RESPONSES,
    ROLLOUT_CLEAR_RESPONSES,
    ROLLOUT_RESPONSES,
)
from modelloop.errors import ErrorCode, ServiceError
from modelloop.web import ADMIN_SECURITY, require_admin


def _controller(controller: RolloutController | None) -> RolloutController:
    if controller is None:
        raise ServiceError(
            "rollouts are off on this server: they need monitoring (their state lives in its store)",
            ErrorCode.NOT_FOUND,
        )
    return controller


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers={"cache-control": "no-store"})


def create_rollout_router(controller: RolloutController | None, admin_token: str | None) -> APIRouter:
    """The rollout routes.

    Args:
        controller: The rollout controller; None when monitoring is off (every route 404s,
            saying so).
        admin_token: The admin bearer token of the POST routes; None turns them off (403).

    Returns:
        A router to mount on the REST app.
    """
    router = APIRouter(tags=["monitoring"])

    @router.get(
        "/monitoring/rollouts/{name}",
        summary="A model's rollout: versions, share, guardrails, history",
        responses=ROLLOUT_RESPONSES,
    )
    async def rollout(name: str) -> Response:
        return _json(await asyncio.to_thread(_controller(controller).status, name))

    @router.post(
        "/monitoring/rollouts/{name}/clear",
        summary="Forget a model's rollout state, RETIRED versions included (admin)",
        openapi_extra={**ADMIN_SECURITY},
        responses=ROLLOUT_CLEAR_RESPONSES,
    )
    async def clear(name: str, request: Request) -> Response:
        require_admin(request, admin_token)
        return _json(await asyncio.to_thread(_controller(controller).clear, name))

    @router.post(
        "/monitoring/rollouts/{name}/{action}",
        summary="Promote, roll back or pause a model's rollout (admin)",
        openapi_extra={**ADMIN_SECURITY},
        responses=ROLLOUT_ACTION_RESPONSES,
    )
    async def act(name: str, action: str, request: Request) -> Response:
        require_admin(request, admin_token)
        if action not in ACTIONS:
            raise ServiceError(
                f"unknown rollout action {action!r}; use one of {', '.join(ACTIONS)}", ErrorCode.NOT_FOUND
            )
        return _json(await asyncio.to_thread(_controller(controller).act, name, action))

    return router


# A rollout's state as a verdict class of the status page: running is a warning to watch.
_STATE_VERDICTS = {"canary": "warn", "shadow": "warn", "promoted": "ok", "rolled_back": "bad"}


class RolloutPart:
    """The rollout part of a model's card on the status page: the rollout on record, if any.

    Args:
        controller: The rollout controller; None when monitoring is off (no part).
    """

    def __init__(self, controller: RolloutController | None) -> None:
        self._controller = controller

    def html(self, model: str) -> str:
        """The part's HTML for one model, from the state last read from the store; every value escaped.

        Returns:
            "" without a controller or a rollout on record; else the state (as a word in
            its verdict's colour), champion, candidate, candidate share, shadow agreement and
            reason.
        """
        if self._controller is None:
            return ""
        doc = self._controller.documents().get(model)
        state = doc.state if doc is not None else {}
        if not state.get("id"):
            return ""
        candidate = state.get("candidate")
        values = state.get("guardrails", {}).get(str(candidate), {}) if candidate is not None else {}
        agreement = values.get("agreement")
        phase = str(state.get("state"))
        shown = phase + (" (paused)" if state.get("paused") else "")
        verdict = _STATE_VERDICTS.get(phase, "idle")
        facts = [
            f"champion v{state.get('champion')}",
            f"candidate {'–' if candidate is None else f'v{candidate}'}",
            f"candidate share {current_share(state):g} %",
            f"shadow agreement {'–' if agreement is None else f'{agreement:.1%}'}",
        ]
        reason = str(state.get("reason", ""))
        return (
            '<div class="part rollout" data-part="rollout"><h3>Rollout</h3>'
            f'<span class="pill {verdict}" data-verdict="rollout">{html.escape(shown)}</span> '
            + " · ".join(html.escape(f) for f in facts)
            + (f'<p class="why">{html.escape(reason)}</p>' if reason else "")
            + "</div>"
        )
