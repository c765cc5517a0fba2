"""Rollouts judged on live guardrails: the state in the store, promotion and rollback.

:class:`RolloutController` is the :class:`~modelloop.serving.types.RolloutRouter` the
composition root hands to serving. Serving asks it for each model's assignment (champion,
candidate, share) and tells it how every model call of a rollout pair went; every
``rollout_interval_s`` the controller

1. adds what this process served since the last pass to the store's totals
   (``rollout_traffic``, ``rollout_latency``);
2. reads every model's rollout state from the store, so every worker and replica routes
   alike (the store is the one source of truth; a restart reads it back);
3. starts a rollout when a new version is AVAILABLE beside an older one, and judges each
   running rollout on the guardrails, on the same footing for both versions; a
   transition is a compare-and-set write, so when several processes judge at once one
   write wins and the others follow it.

The guardrails are :mod:`~modelloop.control.rollout.guardrails`'s, judged over everything the
rollout served so far (every worker's); the state document and its transitions are
:mod:`~modelloop.control.rollout.state`'s.

A step is promoted once the candidate has ``step_min_requests`` calls at it and the
guardrails pass; after the last step (100 %) the candidate becomes the champion. Any breach
rolls back at once: the candidate stops taking traffic, is RETIRED with the reason, and is
not loaded again until a newer version appears or an operator promotes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelloop.control.rollout.guardrails import (
    MIN_BREACH_SAMPLES,
    VersionEvidence,
    guardrail_values,
    judge,
    latency_bucket,
    score_labels,
)
from modelloop.control.rollout.state import (
    ACTIONS,
    EVENTS,
    STATES,
    advanced,
    apply_action,
    assignment_of,
    current_share,
    describe,
    note,
    rolled_back,
)
from modelloop.errors import ErrorCode, ServiceError
from modelloop.monitoring.drift import psi
from modelloop.monitoring.stores import Stores, StoreUnavailable
from modelloop.monitoring.stores.binding import RepositoryIdentity, RepositoryMismatch
from modelloop.monitoring.stores.records import CLASSIFIER_TASKS
from modelloop.monitoring.stores.rollouts import RolloutDoc, RolloutTraffic
from modelloop.serving.types import (
    ModelCatalog,
    ModelState,
    RolloutAssignment,
    RolloutPolicy,
    resolve_policy,
)

logger = logging.getLogger(__name__)

# The first calls of each version in each process are left out of its latency: a version
# that has just loaded runs them while its thread pool and its batcher settle.
LATENCY_WARMUP_CALLS = 20
# Predictions read per version for the prediction drift between the versions.
PREDICTION_LIMIT = 5_000
# Labelled rows read per version; a rollout is judged on at most this many of its newest.
LABEL_LIMIT = 20_000


class RolloutMetrics:
    """``modelloop_rollout_share``, ``modelloop_rollout_state`` and ``modelloop_rollout_events_total``.

    Args:
        registry: Where they are registered (the server's).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.share = Gauge(
            "modelloop_rollout_share",
            "Share of a model's unpinned traffic each version of a rollout answers (0..1).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.state = Gauge(
            "modelloop_rollout_state",
            "1 on the current state of a rollout's version (canary, shadow, promoted, rolled_back).",
            ["model", "version", "state"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.events = Counter(
            "modelloop_rollout_events",
            "Rollout transitions: started, step, promoted, rolled_back, paused.",
            ["model", "event"],
            registry=registry,
        )
        self._shown: dict[str, tuple[str, ...]] = {}

    def show(self, model: str, state: dict[str, Any]) -> None:
        """Sets the gauges of one model from its rollout state."""
        champion, candidate = state.get("champion"), state.get("candidate")
        share = current_share(state)
        versions = tuple(str(v) for v in (champion, candidate) if v is not None)
        for version in self._shown.get(model, ()):
            if version not in versions:
                with contextlib.suppress(KeyError):
                    self.share.remove(model, version)
                for name in STATES:
                    with contextlib.suppress(KeyError):
                        self.state.remove(model, version, name)
        self._shown[model] = versions
        if champion is not None:
            self.share.labels(model=model, version=str(champion)).set(1.0 - share / 100.0)
        if candidate is not None:
            self.share.labels(model=model, version=str(candidate)).set(share / 100.0)
        subject = candidate if candidate is not None else champion
        if subject is not None:
            for name in STATES:
                self.state.labels(model=model, version=str(subject), state=name).set(
                    1.0 if state.get("state") == name else 0.0
                )


@dataclass(slots=True)
class _Pending:
    requests: int = 0
    errors: int = 0
    shadow_rows: int = 0
    shadow_agreed: int = 0
    latency: dict[int, int] = field(default_factory=dict)


class RolloutController:
    """The rollout state of every model: routes for serving, judges on guardrails, acts for operators.

    Args:
        stores: Where the state and the traffic totals live (shared by workers and replicas), and
            the labels and predictions the guardrails read.
        catalog: The served models and their versions (the registry).
        defaults: The server-wide rollout policy.
        registry: The server's Prometheus registry.
        task_of: ``(model, version) -> task`` (``multiclass``, ``binary``, ``regression``).
        quarantined: ``model -> sources`` whose labels the guardrails leave out. Defaults
            to none.
        interval_s: Seconds between two passes. Defaults to 1.
        repository: The served repository's identity: the state is read only once the
            store is bound to it (:meth:`bind`). Defaults to None (no check).
        judging: Whether this process starts, judges, promotes and rolls back rollouts.
            A server whose control plane judges (``serve --control-plane``) only counts its
            calls, flushes them and routes by the state it reads. Defaults to True.

    Example:
        >>> controller = RolloutController(stores, registry_of_models, RolloutPolicy(), prometheus, task_of)
        >>> controller.refresh()  # before the models load: a restart routes as before
        >>> await controller.start()
    """

    def __init__(
        self,
        stores: Stores,
        catalog: ModelCatalog,
        defaults: RolloutPolicy,
        registry: CollectorRegistry,
        task_of: Callable[[str, int], str],
        *,
        quarantined: Callable[[str], set[str]] | None = None,
        interval_s: float = 1.0,
        repository: RepositoryIdentity | None = None,
        judging: bool = True,
    ) -> None:
        self.judging = judging
        self.stores = stores
        self.catalog = catalog
        self.defaults = defaults
        self.metrics = RolloutMetrics(registry)
        self.task_of = task_of
        self.quarantined = quarantined or (lambda model: set())
        self.interval_s = interval_s
        self._docs: dict[str, RolloutDoc] = {}
        self._assignments: dict[str, RolloutAssignment] = {}
        self._pending: dict[tuple[str, int, int], _Pending] = {}
        # Calls per (model, version) seen by this process, for the latency warm-up.
        self._calls: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._policies: dict[str, RolloutPolicy] = {}
        self._config_errors: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._act_lock = threading.Lock()
        self.repository = repository
        self._bound = repository is None
        self._mismatch = ""

    # -- serving's side (RolloutRouter) ------------------------------------------------

    def assignment(self, model: str) -> RolloutAssignment | None:
        """The model's rollout state as last read from the store, or None."""
        return self._assignments.get(model)

    def record(self, model: str, version: int, *, ok: bool, seconds: float) -> None:
        """Counts one model call of a running rollout (flushed to the store on the next pass)."""
        self._add(model, version, ok, seconds, 0, 0)

    def record_shadow(
        self, model: str, version: int, *, ok: bool, seconds: float, rows: int, agreed: int
    ) -> None:
        """Counts one shadow call and its agreement with the champion."""
        self._add(model, version, ok, seconds, rows, agreed)

    def _add(self, model: str, version: int, ok: bool, seconds: float, rows: int, agreed: int) -> None:
        doc = self._docs.get(model)
        if doc is None or not doc.state.get("id"):
            return
        key = (doc.state["id"], version, int(doc.state.get("step", 0)))
        bucket = latency_bucket(seconds)
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending()
            pending.requests += 1
            pending.errors += 0 if ok else 1
            pending.shadow_rows += rows
            pending.shadow_agreed += agreed
            calls = self._calls[(model, version)] = self._calls.get((model, version), 0) + 1
            if calls > LATENCY_WARMUP_CALLS:
                pending.latency[bucket] = pending.latency.get(bucket, 0) + 1

    # -- the loop ----------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the passes, every ``interval_s``."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="rollout-controller")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.tick)
            except StoreUnavailable as exc:
                logger.warning(
                    "rollouts: the store is unavailable (%s); routing stays as it was", exc.message
                )
            except RepositoryMismatch as exc:
                if exc.message != self._mismatch:
                    logger.error("rollouts are off: %s", exc.message)
                self._mismatch = exc.message
            except Exception:
                logger.exception("rollout pass failed")

    async def stop(self) -> None:
        """Stops the passes and writes the counts not yet flushed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(StoreUnavailable):
            await asyncio.to_thread(self.flush)

    def tick(self, now: float | None = None) -> None:
        """One pass: flush the counts, read the state, start and judge rollouts (blocking)."""
        self.flush()
        self.refresh()
        if not self.judging:
            return
        for model in self.catalog.model_names():
            try:
                self._pass(model, time.time() if now is None else now)
            except ServiceError as exc:
                if isinstance(exc, StoreUnavailable):
                    raise
                logger.debug("rollouts: model %s: %s", model, exc.message)

    def flush(self) -> None:
        """Adds the counts gathered since the last flush to the store's totals."""
        with self._lock:
            pending, self._pending = self._pending, {}
        rows = [
            RolloutTraffic(
                rollout, version, step, p.requests, p.errors, p.shadow_rows, p.shadow_agreed, p.latency
            )
            for (rollout, version, step), p in pending.items()
        ]
        try:
            self.stores.rollouts.add_rollout_traffic(rows)
        except StoreUnavailable:
            with self._lock:  # keep them for the next pass
                for row in rows:
                    key = (row.rollout, row.version, row.step)
                    p = self._pending.setdefault(key, _Pending())
                    p.requests += row.requests
                    p.errors += row.errors
                    p.shadow_rows += row.shadow_rows
                    p.shadow_agreed += row.shadow_agreed
                    for b, n in row.latency.items():
                        p.latency[b] = p.latency.get(b, 0) + n
            raise

    def bind(self) -> None:
        """Binds the store to the served repository, once (see :mod:`~modelloop.monitoring.stores.binding`).

        A store with no repository recorded adopts this one; with rollout state written
        before, a warning says that a rollout naming versions this repository lacks keeps
        them out (each one is shown with why) until ``modelloop rollout clear NAME``.

        Raises:
            RepositoryMismatch: The store describes another repository (nothing is read).
            StoreUnavailable: The store cannot be reached.
        """
        if self._bound or self.repository is None:
            return
        binding = self.stores.binding.bind_repository(self.repository)
        self._bound = True
        if binding.adopted:
            logger.info("the monitoring store now describes the repository %s", self.repository.location)
        if binding.had_rollouts:
            logger.warning(
                "the monitoring store held rollout state from before it recorded its repository; "
                "it now describes %s. A version its rollouts RETIRED stays out, shown with why in "
                "the model's status; if that state came from another repository, clear it with "
                "`modelloop rollout clear NAME`",
                self.repository.location,
            )

    def refresh(self) -> None:
        """Reads every model's rollout state from the store; serving routes by it.

        Raises:
            RepositoryMismatch: The store describes another repository (see :meth:`bind`).
            StoreUnavailable: The store cannot be reached.
        """
        self.bind()
        docs = self.stores.rollouts.rollouts()
        self._docs = docs
        self._assignments = {model: assignment_of(doc.state) for model, doc in docs.items()}
        for model, doc in docs.items():
            self.metrics.show(model, doc.state)

    def documents(self) -> dict[str, RolloutDoc]:
        """Every model's rollout state as last read from the store."""
        return dict(self._docs)

    def policy(self, model: str) -> RolloutPolicy:
        """The model's policy; an invalid config is refused (logged once) and the last good one kept."""
        try:
            raw = self.catalog.model_options(model, "rollout")
        except (ServiceError, KeyError):
            raw = {}
        policy, error = resolve_policy(self.defaults, raw)
        if policy is None:
            if self._config_errors.get(model) != error:
                logger.error("model %s: %s; the current routing goes on", model, error)
            self._config_errors[model] = error
            return self._policies.get(model, self.defaults.model_copy(update={"mode": "off"}))
        self._config_errors.pop(model, None)
        self._policies[model] = policy
        return policy

    def _pass(self, model: str, now: float) -> None:
        policy = self.policy(model)
        doc = self._docs.get(model)
        if policy.mode == "off":
            return  # serving routes as today; a rollout left running waits for the mode to return
        if self._maybe_start(model, policy, doc, now) is not None:
            return
        if (
            doc is None
            or doc.state.get("state") not in ("canary", "shadow")
            or doc.state.get("candidate") is None
        ):
            return
        evidence = self._evidence(model, doc.state)
        champion, candidate = doc.state["champion"], doc.state["candidate"]
        labels_expected = self.stores.feedback.count_labels(model, champion) > 0
        verdict = judge(
            policy,
            doc.state["state"],
            evidence.get(champion, VersionEvidence()),
            evidence.get(candidate, VersionEvidence()),
            labels_expected=labels_expected,
            paused=bool(doc.state.get("paused")),
        )
        state = dict(doc.state)
        state["guardrails"] = guardrail_values(evidence, champion, candidate, verdict)
        state["guardrails"][str(candidate)]["prediction_drift"] = self._prediction_drift(
            model, champion, candidate, float(doc.state["started"])
        )
        state["evaluated"] = now
        if verdict.action == "rollback":
            self._write(model, doc, rolled_back(state, verdict.reason, now), "rolled_back")
        elif verdict.action == "promote":
            self._write(model, doc, advanced(state, now, "the guardrails passed"), None)
        else:
            state["reason"] = verdict.reason
            self._write(model, doc, state, None)

    def _maybe_start(
        self, model: str, policy: RolloutPolicy, doc: RolloutDoc | None, now: float
    ) -> RolloutDoc | None:
        available = sorted(s.version for s in self.catalog.statuses(model) if s.state is ModelState.AVAILABLE)
        retired = {int(v) for v in (doc.state.get("retired", {}) if doc is not None else {})}
        live = [v for v in available if v not in retired]
        if len(live) < 2:
            return None
        candidate = live[-1]
        if doc is not None and candidate in (doc.state.get("champion"), doc.state.get("candidate")):
            return None
        stored_champion = doc.state.get("champion") if doc is not None else None
        champion = stored_champion if stored_champion in live and stored_champion < candidate else live[-2]
        state: dict[str, Any] = {
            "id": f"{model}-{candidate}-{int(now * 1000)}",
            "model": model,
            "champion": champion,
            "candidate": candidate,
            "mode": policy.mode,
            "steps": list(policy.steps),
            "step": 0,
            "state": "shadow" if policy.mode == "shadow" else "canary",
            "paused": False,
            "reason": "started",
            "started": now,
            "step_started": now,
            "retired": dict(doc.state.get("retired", {})) if doc is not None else {},
            "retired_at": dict(doc.state.get("retired_at", {})) if doc is not None else {},
            "retired_by": dict(doc.state.get("retired_by", {})) if doc is not None else {},
            "history": [],
            "guardrails": {},
        }
        share = current_share(state)
        note(
            state,
            now,
            "started",
            f"version {candidate} against champion {champion}, {policy.mode} at {share:g} %",
        )
        written = self._write(model, doc, state, "started")
        if written is not None:
            logger.info(
                "model %s: rollout of version %s against %s started (%s)",
                model,
                candidate,
                champion,
                policy.mode,
            )
        return written

    def _write(
        self, model: str, doc: RolloutDoc | None, state: dict[str, Any], event: str | None
    ) -> RolloutDoc | None:
        """Compare-and-set; on success counts ``event`` (and "step"/"promoted" ones the state notes)."""
        new = RolloutDoc(model, doc.revision if doc is not None else 0, state)
        if not self.stores.rollouts.save_rollout(new):
            self.refresh()  # another worker or replica wrote first: follow it
            return None
        new.revision += 1
        self._docs[model] = new
        self._assignments[model] = assignment_of(state)
        self.metrics.show(model, state)
        previous = (
            len(doc.state.get("history", []))
            if doc is not None and doc.state.get("id") == state.get("id")
            else 0
        )
        events = [entry["event"] for entry in state.get("history", [])[previous:]]
        if event is not None and event not in events:
            events.append(event)
        for name in events:
            if name in EVENTS:
                self.metrics.events.labels(model=model, event=name).inc()
        return new

    def _evidence(self, model: str, state: dict[str, Any]) -> dict[int, VersionEvidence]:
        evidence: dict[int, VersionEvidence] = {}
        step = int(state.get("step", 0))
        for row in self.stores.rollouts.rollout_traffic(state["id"]):
            ev = evidence.setdefault(row.version, VersionEvidence())
            ev.requests += row.requests
            ev.errors += row.errors
            ev.shadow_rows += row.shadow_rows
            ev.shadow_agreed += row.shadow_agreed
            if row.step == step:
                ev.step_requests += row.requests
            for b, n in row.latency.items():
                ev.latency[b] = ev.latency.get(b, 0) + n
        excluded = self.quarantined(model)
        for version in (state["champion"], state["candidate"]):
            ev = evidence.setdefault(version, VersionEvidence())
            rows = [
                r
                for r in self.stores.feedback.recent_labelled(
                    model, version, LABEL_LIMIT, exclude_sources=excluded
                )
                if r.created >= state["started"]
            ]
            score_labels(ev, rows, self.task_of(model, version))
        return evidence

    def _prediction_drift(self, model: str, champion: int, candidate: int, since: float) -> float | None:
        """PSI of the candidate's predictions against the champion's during the rollout."""
        ours = self.stores.predictions.predicted_since(model, candidate, since, PREDICTION_LIMIT)
        theirs = self.stores.predictions.predicted_since(model, champion, since, PREDICTION_LIMIT)
        if len(ours) < MIN_BREACH_SAMPLES or len(theirs) < MIN_BREACH_SAMPLES:
            return None
        if self.task_of(model, candidate) in CLASSIFIER_TASKS:
            classes = int(max(max(ours), max(theirs))) + 1
            reference = np.bincount(np.asarray(theirs, dtype=np.int64), minlength=classes) / len(theirs)
            current = np.bincount(np.asarray(ours, dtype=np.int64), minlength=classes) / len(ours)
        else:
            edges = np.unique(np.quantile(np.asarray(theirs), np.linspace(0, 1, 11)))
            if len(edges) < 2:
                return None
            reference = np.histogram(np.clip(theirs, edges[0], edges[-1]), edges)[0] / len(theirs)
            current = np.histogram(np.clip(ours, edges[0], edges[-1]), edges)[0] / len(ours)
        return round(psi(reference, current), 6)

    # -- operators ---------------------------------------------------------------------

    def status(self, model: str) -> dict[str, Any]:
        """The rollout of a model as ``GET /monitoring/rollouts/{model}`` shows it (blocking).

        Raises:
            ServiceError: NOT_FOUND for an unknown model, or one that never had a rollout.
            RepositoryMismatch: The store describes another repository.
            StoreUnavailable: The store cannot be reached.
        """
        self.bind()
        if not self.catalog.has_model(model):
            raise ServiceError(f"model {model!r} is not in the repository", ErrorCode.NOT_FOUND)
        self.policy(model)
        doc = self.stores.rollouts.rollouts(model).get(model)
        error = self._config_errors.get(model, "")
        if doc is None or not doc.state.get("id"):
            why = f"; {error}" if error else ""
            raise ServiceError(
                f"model {model!r} has no rollout in progress or on record{why}", ErrorCode.NOT_FOUND
            )
        return describe(doc.state, error)

    def act(self, model: str, action: str, now: float | None = None) -> dict[str, Any]:
        """Promotes (one step; a rolled-back candidate is restored), rolls back or pauses (blocking).

        Raises:
            ServiceError: NOT_FOUND (unknown model, no rollout), FAILED_PRECONDITION
                (the action does not apply to the rollout's state).
        """
        if action not in ACTIONS:
            raise ServiceError(
                f"unknown action {action!r}; use one of {', '.join(ACTIONS)}", ErrorCode.NOT_FOUND
            )
        t = time.time() if now is None else now
        with self._act_lock:
            for _ in range(5):
                self.status(model)  # 404s first
                doc = self.stores.rollouts.rollouts(model)[model]
                state = dict(doc.state)
                new, event = apply_action(state, action, t)
                if self._write(model, doc, new, event) is not None:
                    logger.info("model %s: operator %s -> %s", model, action, new["state"])
                    return describe(new, self._config_errors.get(model, ""))
        raise ServiceError(f"model {model!r}: the rollout kept changing; try again", ErrorCode.UNAVAILABLE)

    def clear(self, model: str) -> dict[str, Any]:
        """Forgets a model's rollout state, RETIRED versions included (blocking).

        The registry then loads what the version policy wants; with a rollout mode on, a
        new version beside a serving one starts a fresh rollout.

        Returns:
            ``{"model", "cleared": True, "retired_released", "previous"}``: the versions no
            longer kept out, and the state that was forgotten.

        Raises:
            ServiceError: NOT_FOUND when the model has no rollout state.
            RepositoryMismatch: The store describes another repository.
            StoreUnavailable: The store cannot be reached.
        """
        self.bind()
        with self._act_lock:
            doc = self.stores.rollouts.delete_rollout(model)
            if doc is None:
                raise ServiceError(f"model {model!r} has no rollout state to clear", ErrorCode.NOT_FOUND)
            self._docs.pop(model, None)
            self._assignments.pop(model, None)
            self.metrics.show(model, {})
        released = sorted(int(v) for v in doc.state.get("retired", {}))
        logger.warning(
            "model %s: rollout state cleared by an operator (rollout %s, %s; RETIRED versions released: %s)",
            model,
            doc.state.get("id"),
            doc.state.get("state"),
            ", ".join(str(v) for v in released) or "none",
        )
        return {
            "model": model,
            "cleared": True,
            "retired_released": released,
            "previous": describe(doc.state),
        }
