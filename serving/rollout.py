"""Safe rollout of a new version: the policy, and serving's side of champion and candidate.

When a model's rollout ``mode`` (the ``"rollout"`` section of its ``config.json``, over the
server-wide defaults ``MODELLOOP_ROLLOUT__*``) is ``canary`` or ``shadow`` and a new version
becomes AVAILABLE while an older one serves, the older one stays loaded as the *champion*
and the new one is the *candidate*. Which share of traffic the candidate gets, and whether
it was promoted or rolled back, is the rollout state that monitoring keeps in its store and
judges on live guardrails; serving only reads it, through
:class:`~modelloop.serving.types.RolloutRouter`, and tells it how every request of the pair
went. The policy (:class:`~modelloop.serving.types.RolloutPolicy`), the state serving reads
and that interface live in :mod:`modelloop.serving.types`, the module monitoring may import.

:class:`RolloutCoordinator` is what the registry and the data plane call:

- :meth:`RolloutCoordinator.plan` adds the champion to the versions the version policy
  wants, and leaves out RETIRED versions (rolled back, not to be loaded again); each one
  the version policy would have loaded is logged and shown, with why
  (:meth:`RolloutCoordinator.kept_out`), until a newer version replaces it or an operator
  clears the state (``modelloop rollout clear NAME``);
- :meth:`RolloutCoordinator.default_version` is the version an unpinned request resolves to
  (the champion while a rollout runs);
- :meth:`RolloutCoordinator.choose` splits unpinned requests by their request id: a stable
  hash, so that a retried request goes to the same version, and a share that grows only
  adds ids to the candidate's side.

With ``mode: off`` (the default) none of this changes what is served.

Example:

```python
policy, error = resolve_policy(RolloutPolicy(), {"mode": "canary", "steps": [10, 50, 100]})
in_share("digits", "order-17", 10.0)  # the same answer on every worker, every time
```
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelloop.serving.types import RolloutAssignment, RolloutPolicy, RolloutRouter, resolve_policy

logger = logging.getLogger(__name__)

# Buckets of the request-id split: shares are honoured to 0.01 %.
_SPLIT_BUCKETS = 10_000


def in_share(model: str, request_id: str, share: float) -> bool:
    """Whether a request goes to the candidate at ``share`` percent: a stable hash of its id.

    The same id lands in the same bucket in every process and across restarts; a larger
    share only adds buckets, so an id on the candidate's side stays there as it grows.
    """
    if share <= 0.0:
        return False
    if share >= 100.0:
        return True
    digest = hashlib.blake2b(f"{model}\0{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _SPLIT_BUCKETS < share * (_SPLIT_BUCKETS / 100.0)


def _kept_out(
    model: str, assignment: RolloutAssignment, on_disk: Sequence[int], chosen: Sequence[int]
) -> dict[int, str]:
    """The versions the version policy chose that are RETIRED, each with a one-line reason."""
    named = {assignment.champion, *assignment.retired}
    if assignment.candidate is not None:
        named.add(assignment.candidate)
    missing = sorted(v for v in named if v > 0 and v not in on_disk)
    foreign = (
        f" (the rollout state also names version{'s' if len(missing) > 1 else ''} "
        f"{', '.join(str(v) for v in missing)}, which this repository lacks: it may come from "
        f"another repository)"
        if missing
        else ""
    )
    return {
        v: (
            f"version {v} is kept out: {assignment.retired_why.get(v) or 'RETIRED by a rollout'}"
            f"{foreign}; clear with `modelloop rollout clear {model}`"
        )
        for v in chosen
        if v in assignment.retired
    }


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """How one unpinned request of a model with a rollout in progress is served.

    Attributes:
        answer: The version that answers (champion or candidate).
        fallback: The champion, when the candidate answers: it answers instead if the
            candidate fails, so that a bad candidate fails no client request.
        shadow: The candidate, in shadow mode: it gets a copy of the request.
    """

    answer: int
    fallback: int | None = None
    shadow: int | None = None


@dataclass(slots=True)
class _ModelRollout:
    policy: RolloutPolicy | None = None
    error: str = ""
    pair: tuple[int, int] | None = None
    notes: set[str] = field(default_factory=set)
    kept_out: dict[int, str] = field(default_factory=dict)


class RolloutCoordinator:
    """Serving's side of rollouts: which versions to keep loaded and which answers a request.

    Args:
        defaults: The server-wide rollout policy (``MODELLOOP_ROLLOUT__*``).
        router: The rollout state; None leaves every model as if its mode were ``off``.
    """

    def __init__(self, defaults: RolloutPolicy, router: RolloutRouter | None = None) -> None:
        self.defaults = defaults
        self.router = router
        self._models: dict[str, _ModelRollout] = {}

    def policy(self, model: str, raw: dict[str, Any]) -> RolloutPolicy:
        """The model's policy; an invalid section is refused (logged once) and the last good one kept.

        Args:
            model: Model name.
            raw: The ``"rollout"`` section of its ``config.json``.

        Returns:
            The policy in force: the new one if valid, else the last good one, else the
            defaults with the mode ``off``.
        """
        state = self._models.setdefault(model, _ModelRollout())
        policy, error = resolve_policy(self.defaults, raw)
        if policy is None:
            if error != state.error:
                kept = state.policy.mode if state.policy is not None else "off"
                logger.error("model %s: %s; the current routing goes on (mode %s)", model, error, kept)
            state.error = error
            if state.policy is None:
                state.policy = self.defaults.model_copy(update={"mode": "off"})
            return state.policy
        if state.error:
            logger.info("model %s: the rollout config is valid again", model)
        state.policy, state.error = policy, ""
        return policy

    def config_error(self, model: str) -> str:
        """Why the model's rollout section was refused, or ""."""
        state = self._models.get(model)
        return state.error if state is not None else ""

    def plan(
        self,
        model: str,
        raw: dict[str, Any],
        on_disk: Sequence[int],
        select: Callable[[list[int]], list[int]],
        available: Sequence[int],
    ) -> list[int]:
        """The versions to load: the version policy's choice, with the champion kept beside it.

        RETIRED versions are left out before the version policy chooses, so a rolled-back
        version is not loaded again until a newer one appears (or an operator promotes it).

        Args:
            model: Model name.
            raw: The model's ``"rollout"`` section.
            on_disk: The versions in the repository.
            select: The version policy (``VersionPolicy.select``).
            available: The versions AVAILABLE now.

        Returns:
            The versions to load, ascending.
        """
        state = self._models.setdefault(model, _ModelRollout())
        policy = self.policy(model, raw)
        assignment = self.router.assignment(model) if self.router is not None else None
        if policy.mode == "off" or self.router is None:
            state.pair = None
            self._keep_out(model, state, {})
            return select(list(on_disk))
        retired = assignment.retired if assignment is not None else frozenset()
        wanted = select([v for v in on_disk if v not in retired])
        if assignment is not None and retired:
            self._keep_out(model, state, _kept_out(model, assignment, on_disk, select(list(on_disk))))
        else:
            self._keep_out(model, state, {})
        if not wanted:
            state.pair = None
            return wanted
        newest = max(wanted)
        champion: int | None
        if assignment is not None and assignment.champion in on_disk and assignment.champion not in retired:
            champion = assignment.champion if assignment.champion < newest else None
        else:
            champion = max((v for v in available if v < newest and v not in retired), default=None)
        if champion is None:
            state.pair = None
            return wanted
        if state.pair != (champion, newest):
            logger.info(
                "model %s: version %s is the champion, version %s the candidate", model, champion, newest
            )
        state.pair = (champion, newest)
        return sorted({*wanted, champion})

    def kept_out(self, model: str) -> dict[int, str]:
        """Versions the version policy wants that the stored rollout state keeps out, with why."""
        state = self._models.get(model)
        return dict(state.kept_out) if state is not None else {}

    @staticmethod
    def _keep_out(model: str, state: _ModelRollout, kept: dict[int, str]) -> None:
        """Notes the versions kept out; logs each one when it starts being kept out (or why changes)."""
        for version, why in sorted(kept.items()):
            if state.kept_out.get(version) != why:
                logger.warning("model %s: %s", model, why)
        state.kept_out = kept

    def pair(self, model: str) -> tuple[int, int] | None:
        """``(champion, candidate)`` while the model keeps both loaded, else None."""
        state = self._models.get(model)
        return state.pair if state is not None else None

    def default_version(self, model: str, available: Sequence[int]) -> int:
        """The version an unpinned request resolves to: the champion while a pair is loaded.

        Args:
            model: Model name.
            available: The AVAILABLE versions, ascending (not empty).

        Returns:
            The champion (the promoted candidate once the state says so), else the latest.
        """
        pair = self.pair(model)
        if pair is None or pair[0] not in available:
            return available[-1]
        assignment = self.router.assignment(model) if self.router is not None else None
        if assignment is not None and assignment.champion in pair and assignment.champion in available:
            return assignment.champion
        return pair[0]

    def choose(self, model: str, resolved: int, request_id: str) -> RouteChoice | None:
        """How an unpinned request that resolved to ``resolved`` is served.

        Args:
            model: Model name.
            resolved: The version :meth:`default_version` chose (the champion).
            request_id: The request's id (the split's key).

        Returns:
            None when no rollout of this pair is on trial (serve ``resolved`` as usual),
            else the choice.
        """
        pair = self.pair(model)
        if pair is None or self.router is None:
            return None
        assignment = self.router.assignment(model)
        if (
            assignment is None
            or not assignment.active
            or (assignment.champion, assignment.candidate) != pair
            or resolved != assignment.champion
        ):
            return None
        candidate = pair[1]
        if assignment.state == "shadow":
            return RouteChoice(answer=resolved, shadow=candidate)
        if in_share(model, request_id, assignment.share):
            return RouteChoice(answer=candidate, fallback=resolved)
        return RouteChoice(answer=resolved)
