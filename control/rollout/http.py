"""The rollout routes and the rollout section of the status page.

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


class RolloutSection:
    """The status page's rollout table: one row per model with a rollout on record.

    Args:
        controller: The rollout controller; None when monitoring is off.
    """

    def __init__(self, controller: RolloutController | None) -> None:
        self._controller = controller

    def html(self) -> str:
        """The section's HTML, from the state last read from the store; every value escaped."""
        if self._controller is None:
            return ""
        rows = []
        for model, doc in sorted(self._controller.documents().items()):
            state = doc.state
            if not state.get("id"):
                continue
            candidate = state.get("candidate")
            values = state.get("guardrails", {}).get(str(candidate), {}) if candidate is not None else {}
            agreement = values.get("agreement")
            cells = [
                model,
                str(state.get("champion")),
                "–" if candidate is None else str(candidate),
                str(state.get("state")) + (" (paused)" if state.get("paused") else ""),
                f"{current_share(state):g} %",
                "–" if agreement is None else f"{agreement:.1%}",
                str(state.get("reason", "")),
            ]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        if not rows:
            return '<section id="rollouts"><h2>Rollouts</h2><p>No rollout on record.</p></section>'
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "model",
                "champion",
                "candidate",
                "state",
                "candidate share",
                "shadow agreement",
                "reason",
            )
        )
        return (
            '<section id="rollouts"><h2>Rollouts</h2><table><thead><tr>'
            + head
            + "</tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table></section>"
        )
