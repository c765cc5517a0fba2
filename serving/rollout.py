"""Safe rollout of a new version: the policy, and serving's side of champion and candidate.

When a model's rollout ``mode`` (the ``"rollout"`` section of its ``config.json``, over the
server-wide defaults ``MODELLOOP_ROLLOUT__*``) is ``canary`` or ``shadow`` and a new version
becomes AVAILABLE while an older one serves, the older one stays loaded as the *champion*
and the new one is the *candidate*. Which share of traffic the candidate gets, and whether
it was promoted or rolled back, is the rollout state that monitoring keeps in its store and
judges on live guardrails; serving only reads it, through :class:`RolloutRouter`, and tells
it how every request of the pair went.

:class:`RolloutCoordinator` is what the registry and the data plane call:

- :meth:`RolloutCoordinator.plan` adds the champion to the versions the version policy
  wants, and leaves out RETIRED versions (rolled back, not to be loaded again);
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
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger(__name__)

RolloutMode = Literal["off", "canary", "shadow"]
# Buckets of the request-id split: shares are honoured to 0.01 %.
_SPLIT_BUCKETS = 10_000


class RolloutPolicy(BaseModel):
    """How a new version of one model is rolled out (the ``"rollout"`` section of ``config.json``).

    Example:

    ```json
    {"rollout": {"mode": "canary", "steps": [10, 50, 100], "step_min_requests": 200,
                 "min_labels": 100, "max_error_rate": 0.01, "max_accuracy_drop": 0.02,
                 "max_latency_ratio": 2.0}}
    ```
    """

    model_config = ConfigDict(extra="forbid")

    mode: RolloutMode = "off"
    """``off`` (a new version takes all traffic once AVAILABLE), ``canary`` (a share of the
    traffic goes to the candidate) or ``shadow`` (the candidate answers a copy of each
    request off the request path; its answers are compared, never returned)."""
    steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0])
    """The candidate's share of unpinned traffic at each step, in percent; strictly
    increasing, ending at 100."""
    step_min_requests: int = Field(default=200, ge=1)
    """Requests the candidate must answer at a step before the step can be promoted."""
    min_labels: int = Field(default=100, ge=0)
    """Labelled rows the candidate needs before a promotion, where labels arrive."""
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    """Highest error rate (failed model calls) the candidate may have."""
    max_accuracy_drop: float = Field(default=0.02, ge=0.0, le=1.0)
    """Largest drop of accuracy from the champion's (classifiers), in absolute terms."""
    max_mae_increase: float = Field(default=0.1, ge=0.0)
    """Largest rise of MAE over the champion's (regressors), relative: 0.1 = 10 % worse."""
    max_latency_ratio: float = Field(default=2.0, ge=1.0)
    """Highest ratio of the candidate's p99 model latency to the champion's."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    """Confidence of the one-sided bounds the guardrails use."""

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("steps must not be empty; end them at 100")
        for step in steps:
            if not (0.0 < step <= 100.0):
                raise ValueError(f"step {step:g} is outside (0, 100]; steps are percentages of traffic")
        for low, high in itertools.pairwise(steps):
            if high <= low:
                raise ValueError(f"steps must increase; {high:g} follows {low:g}")
        if steps[-1] != 100.0:
            raise ValueError(f"steps must end at 100, not {steps[-1]:g}")
        return steps


def resolve_policy(defaults: RolloutPolicy, raw: dict[str, Any]) -> tuple[RolloutPolicy | None, str]:
    """A model's rollout policy: its ``config.json`` section over the server's defaults.

    Args:
        defaults: The server-wide defaults.
        raw: The model's ``"rollout"`` section (``{}`` when it has none).

    Returns:
        ``(policy, "")``, or ``(None, reason)`` when the section is invalid; the reason
        names each bad field.
    """
    if not raw:
        return defaults, ""
    if not isinstance(raw, dict):
        return None, "rollout must be an object"
    try:
        return RolloutPolicy.model_validate({**defaults.model_dump(), **raw}), ""
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'rollout'}: {err['msg']}" for err in exc.errors()
        )
        return None, f"invalid rollout config ({problems})"


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


@dataclass(frozen=True, slots=True)
class RolloutAssignment:
    """What serving needs of one model's rollout state.

    Attributes:
        champion: The version that serves by default.
        candidate: The version on trial, or None (promoted, or none yet).
        mode: ``canary`` or ``shadow``.
        share: The candidate's share of unpinned traffic, in percent (0 in shadow mode
            and once the rollout ended).
        state: ``canary``, ``shadow``, ``promoted`` or ``rolled_back``.
        retired: Versions that were rolled back and are not loaded again.
    """

    champion: int
    candidate: int | None
    mode: str
    share: float
    state: str
    retired: frozenset[int] = frozenset()

    @property
    def active(self) -> bool:
        """Whether the candidate is on trial (canary or shadow)."""
        return self.candidate is not None and self.state in ("canary", "shadow")


class RolloutRouter(Protocol):
    """Serving's view of the rollout state (monitoring's controller implements it).

    Every method is called on the event loop: it reads a snapshot in memory and never
    blocks or raises.
    """

    def assignment(self, model: str) -> RolloutAssignment | None:
        """The model's rollout state, or None when it never had one."""
        ...

    def record(self, model: str, version: int, *, ok: bool, seconds: float) -> None:
        """Notes one model call of a version in a running rollout (champion or candidate).

        Args:
            model: Model name.
            version: The version that ran the call.
            ok: False when the model failed.
            seconds: How long the model call took.
        """
        ...

    def record_shadow(
        self, model: str, version: int, *, ok: bool, seconds: float, rows: int, agreed: int
    ) -> None:
        """Notes one shadow call of the candidate, and how many of its rows agreed with the champion."""
        ...


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
            return select(list(on_disk))
        retired = assignment.retired if assignment is not None else frozenset()
        wanted = select([v for v in on_disk if v not in retired])
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
