"""A rollout's state document and its transitions: steps, promotion, rollback, operators' actions.

The state is one JSON document per model in the store (:mod:`~modelloop.monitoring.stores.rollouts`);
these functions read it and change it, and the controller writes it back with a
compare-and-set. Any breach rolls back at once: the candidate stops taking traffic, is
RETIRED with the reason, and is not loaded again until a newer version appears or an
operator promotes it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from modelloop.errors import ErrorCode, ServiceError
from modelloop.serving.types import RolloutAssignment

logger = logging.getLogger(__name__)

STATES = ("canary", "shadow", "promoted", "rolled_back")
"""The states of a rollout."""
EVENTS = ("started", "step", "promoted", "rolled_back", "paused")
"""The events ``modelloop_rollout_events_total`` counts."""
ACTIONS = ("promote", "rollback", "pause")
"""What an operator may ask of a rollout."""
# History entries kept in a rollout's document.
_HISTORY_LIMIT = 100


def current_share(state: dict[str, Any]) -> float:
    """The candidate's share of unpinned traffic, in percent, in a rollout state."""
    if state.get("state") != "canary" or state.get("candidate") is None:
        return 0.0
    steps = state.get("steps") or [100.0]
    return float(steps[min(int(state.get("step", 0)), len(steps) - 1)])


def retired_why(state: dict[str, Any], version: str, reason: str) -> str:
    """``RETIRED by rollout <id> (rolled back at <time>: <reason>)``."""
    by = state.get("retired_by", {}).get(version) or state.get("id") or "?"
    at = state.get("retired_at", {}).get(version)
    if at is None:  # state written before the time was kept: the last rollback in the history
        at = next(
            (
                entry.get("t")
                for entry in reversed(state.get("history", []))
                if entry.get("event") == "rolled_back"
                and str(entry.get("reason", "")).startswith(f"version {version} ")
            ),
            None,
        )
    when = (
        f"rolled back at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(at)))}"
        if isinstance(at, int | float)
        else "rolled back"
    )
    return f"RETIRED by rollout {by} ({when}: {reason})"


def assignment_of(state: dict[str, Any]) -> RolloutAssignment:
    """What serving reads of a rollout state: champion, candidate, share and the RETIRED versions."""
    return RolloutAssignment(
        champion=int(state.get("champion", 0)),
        candidate=state.get("candidate"),
        mode=str(state.get("mode", "canary")),
        share=current_share(state),
        state=str(state.get("state", "")),
        retired=frozenset(int(v) for v in state.get("retired", {})),
        retired_why={
            int(v): retired_why(state, str(v), str(reason)) for v, reason in state.get("retired", {}).items()
        },
    )


def note(state: dict[str, Any], now: float, event: str, reason: str) -> None:
    """Adds an event to the state's history (the newest 100 kept) and makes it the current reason."""
    history = list(state.get("history", []))
    history.append(
        {
            "t": now,
            "event": event,
            "step": state.get("step", 0),
            "share": current_share(state),
            "reason": reason,
        }
    )
    state["history"] = history[-_HISTORY_LIMIT:]
    state["reason"] = reason
    state["updated"] = now


def rolled_back(state: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    """Rolls the candidate back: it is RETIRED with the reason."""
    candidate = state["candidate"]
    state["state"] = "rolled_back"
    state["paused"] = False
    retired = dict(state.get("retired", {}))
    retired[str(candidate)] = reason
    state["retired"] = retired
    state["retired_at"] = {**state.get("retired_at", {}), str(candidate): now}
    state["retired_by"] = {**state.get("retired_by", {}), str(candidate): state.get("id")}
    note(state, now, "rolled_back", f"version {candidate} RETIRED: {reason}")
    logger.warning("model %s: version %s rolled back: %s", state.get("model"), candidate, reason)
    return state


def advanced(state: dict[str, Any], now: float, why: str) -> dict[str, Any]:
    """Moves the rollout one step on; after the last step the candidate becomes the champion."""
    steps = state.get("steps") or [100.0]
    if state["state"] == "shadow":
        state["state"], state["step"] = "canary", 0
    elif int(state["step"]) + 1 < len(steps):
        state["step"] = int(state["step"]) + 1
    else:
        old, new = state["champion"], state["candidate"]
        state["state"], state["champion"], state["candidate"] = "promoted", new, None
        state["previous_champion"] = old
        note(state, now, "promoted", f"version {new} is the champion ({why}); version {old} unloads")
        logger.info("model %s: version %s promoted over %s", state.get("model"), new, old)
        return state
    state["step_started"] = now
    state["paused"] = False
    note(
        state,
        now,
        "step",
        f"step {int(state['step']) + 1}: {current_share(state):g} % to version {state['candidate']} ({why})",
    )
    return state


def apply_action(state: dict[str, Any], action: str, now: float) -> tuple[dict[str, Any], str | None]:
    """An operator's action on a rollout state; returns the new state and the event to count."""
    current = state.get("state")
    if action == "rollback":
        if current not in ("canary", "shadow"):
            raise ServiceError(
                f"the rollout is {current}; only a running one can be rolled back",
                ErrorCode.FAILED_PRECONDITION,
            )
        return rolled_back(state, "rolled back by an operator", now), "rolled_back"
    if action == "pause":
        if current not in ("canary", "shadow"):
            raise ServiceError(
                f"the rollout is {current}; only a running one can be paused", ErrorCode.FAILED_PRECONDITION
            )
        state["paused"] = True
        note(
            state,
            now,
            "paused",
            "paused by an operator: no promotion until promote; breaches still roll back",
        )
        return state, "paused"
    if current == "promoted":
        raise ServiceError("the rollout is already promoted", ErrorCode.FAILED_PRECONDITION)
    if current == "rolled_back":
        # An operator asks for the retired version again: it comes back as a fresh canary.
        candidate = state["candidate"]
        retired = dict(state.get("retired", {}))
        retired.pop(str(candidate), None)
        retired_at = {v: t for v, t in state.get("retired_at", {}).items() if v != str(candidate)}
        retired_by = {v: r for v, r in state.get("retired_by", {}).items() if v != str(candidate)}
        state.update(
            retired=retired,
            retired_at=retired_at,
            retired_by=retired_by,
            state="canary",
            step=0,
            paused=False,
            step_started=now,
        )
        note(
            state,
            now,
            "step",
            f"version {candidate} restored by an operator: canary at {current_share(state):g} %",
        )
        return state, None
    return advanced(state, now, "promoted by an operator"), None


def describe(state: dict[str, Any], config_error: str = "") -> dict[str, Any]:
    """The JSON of ``GET /monitoring/rollouts/{model}``."""
    steps = state.get("steps") or [100.0]
    return {
        "model": state.get("model"),
        "id": state.get("id"),
        "champion": state.get("champion"),
        "candidate": state.get("candidate"),
        "mode": state.get("mode"),
        "step": int(state.get("step", 0)) + 1,
        "steps": steps,
        "share": current_share(state),
        "state": state.get("state"),
        "paused": bool(state.get("paused")),
        "reason": state.get("reason", ""),
        "guardrails": state.get("guardrails", {}),
        "retired": state.get("retired", {}),
        "history": state.get("history", []),
        "started": state.get("started"),
        "updated": state.get("updated"),
        "config_error": config_error,
    }
