"""``modelloop rollout status|promote|rollback|pause|clear NAME --url URL``: a rollout from the shell.

A thin client of the server's rollout routes (``GET /monitoring/rollouts/{name}`` and the
admin ``POST .../{promote|rollback|pause|clear}``). It prints a one-line summary, then the
state as JSON; a refusal prints the server's reason on one line and exits 1. ``clear``
forgets the model's rollout state, RETIRED versions included (state another repository
left in the store, or a rollback to undo): the server then loads what the version policy
wants.

Example:

```sh
modelloop rollout status digits --url http://127.0.0.1:8501
MODELLOOP_ADMIN_TOKEN=... modelloop rollout promote digits --url http://127.0.0.1:8501
MODELLOOP_ADMIN_TOKEN=... modelloop rollout clear digits --url http://127.0.0.1:8501
```
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx

from modelloop.errors import ModelloopError
from modelloop.tokens import read_token_file

ACTIONS = ("status", "promote", "rollback", "pause", "clear")
"""The subcommand's actions."""


def admin_token(token_file: Path | None) -> str | None:
    """The admin token: ``--token-file``, else ``$MODELLOOP_ADMIN_TOKEN``, else None."""
    if token_file is not None:
        try:
            return read_token_file(token_file, "--token-file")
        except ValueError as exc:
            raise ModelloopError(str(exc)) from None
    token = os.environ.get("MODELLOOP_ADMIN_TOKEN", "").strip()
    return token or None


def summary(state: dict[str, Any]) -> str:
    """One line: model, versions, state, share and reason (or what ``clear`` forgot)."""
    if state.get("cleared"):
        previous = state.get("previous") or {}
        released = ", ".join(str(v) for v in state.get("retired_released") or []) or "none"
        return (
            f"{state.get('model')}: rollout state cleared (rollout {previous.get('id')}, "
            f"{previous.get('state')}); RETIRED versions released: {released}; the server loads "
            f"what the version policy wants"
        )
    candidate = state.get("candidate")
    versions = f"champion {state.get('champion')}" + (
        f", candidate {candidate}" if candidate is not None else ""
    )
    paused = " (paused)" if state.get("paused") else ""
    return (
        f"{state.get('model')}: {versions}; {state.get('state')}{paused}, step {state.get('step')}"
        f"/{len(state.get('steps') or [])} at {state.get('share'):g} %; {state.get('reason', '')}"
    )


def run_rollout(
    action: str,
    name: str,
    url: str,
    *,
    token: str | None = None,
    timeout_s: float = 30.0,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Runs one action against a server and prints the result.

    Args:
        action: ``status``, ``promote``, ``rollback``, ``pause`` or ``clear``.
        name: The model.
        url: The server's REST base URL.
        token: The admin token (the POST actions need it). Defaults to None.
        timeout_s: The HTTP timeout. Defaults to 30.
        out: Where to print. Defaults to stdout.

    Returns:
        The rollout state the server answered.

    Raises:
        ModelloopError: The server cannot be reached, or refused (the reason it gave).
    """
    if action not in ACTIONS:
        raise ModelloopError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    base = url.rstrip("/")
    target = f"{base}/monitoring/rollouts/{name}"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(timeout=timeout_s) as client:
            if action == "status":
                response = client.get(target)
            else:
                response = client.post(f"{target}/{action}", headers=headers)
    except httpx.HTTPError as exc:
        raise ModelloopError(f"cannot reach {base}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:200]}
    if response.status_code != 200:
        reason = body.get("error", "") if isinstance(body, dict) else ""
        hint = (
            " (set MODELLOOP_ADMIN_TOKEN or --token-file)"
            if response.status_code == 401 and not token
            else ""
        )
        raise ModelloopError(f"{action} {name}: HTTP {response.status_code}: {reason}{hint}")
    stream = out if out is not None else sys.stdout
    print(summary(body), file=stream)
    print(json.dumps(body, indent=2), file=stream)
    return dict(body)
