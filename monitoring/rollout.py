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
   running rollout on the guardrails below, on the same footing for both versions; a
   transition is a compare-and-set write, so when several processes judge at once one
   write wins and the others follow it.

The guardrails, over everything the rollout served so far (every worker's):

- **error rate**: failed model calls / calls. A breach when the one-sided Wilson lower bound
  of the candidate's rate exceeds ``max_error_rate`` (after 10 calls); a step passes when the
  observed rate is at most ``max_error_rate``.
- **latency**: the candidate's p99 model-call latency over the champion's, from histograms
  with 10 % buckets, leaving out each version's first 20 calls in each process (they
  run while a freshly loaded version settles). Judged once both have
  ``step_min_requests`` calls, and at least 50. A call is slow when it is slower than
  ``max_latency_ratio`` x the champion's p99 and at least ``min_latency_difference_ms``
  more; a breach when the one-sided Wilson lower bound of the candidate's slow share exceeds
  the upper bound of the champion's slow share, over the same limit in the same window, by
  more than 1 % (contention that slows both is no breach). A step passes only once latency
  has been judged without a breach.
- **accuracy** (classifiers), from the feedback labels on the requests each version
  answered during the rollout: the Newcombe hybrid score bound (Wilson intervals of both
  accuracies, combined, "method 10") on the difference candidate − champion, one-sided at
  ``confidence``. A breach when its *upper* bound is below ``-max_accuracy_drop`` (the
  candidate is worse beyond doubt, after 10 labels); a step passes only when its *lower*
  bound is at least ``-max_accuracy_drop`` (the candidate is not worse beyond the allowed
  drop) with ``min_labels`` labels. **MAE** (regressors) uses a normal-approximation bound
  on the difference of the mean absolute errors against ``max_mae_increase`` x champion MAE.
- **prediction drift** between the versions: the PSI of the candidate's predicted classes
  (or, for regressors, of its predictions over the champion's deciles) against the
  champion's, on the requests each answered during the rollout (reported, not a gate: a
  better model may well predict differently);
- **shadow agreement**: the share of rows where the candidate's answer to a copy agreed
  with the champion's (reported; shadow mode never promotes by itself).

Labels are expected once the champion has any; without them a step passes on requests,
error rate and latency alone.

A step is promoted once the candidate has ``step_min_requests`` calls at it and the
guardrails pass; after the last step (100 %) the candidate becomes the champion. Any breach
rolls back at once: the candidate stops taking traffic, is RETIRED with the reason, and is
not loaded again until a newer version appears or an operator promotes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelloop.errors import ErrorCode, ServiceError
from modelloop.monitoring.drift import psi
from modelloop.monitoring.stores import Stores, StoreUnavailable
from modelloop.monitoring.stores.binding import RepositoryIdentity, RepositoryMismatch
from modelloop.monitoring.stores.records import CLASSIFIER_TASKS, LabelledRow
from modelloop.monitoring.stores.rollouts import RolloutDoc, RolloutTraffic
from modelloop.serving.types import (
    ModelCatalog,
    ModelState,
    RolloutAssignment,
    RolloutPolicy,
    resolve_policy,
)

logger = logging.getLogger(__name__)

STATES = ("canary", "shadow", "promoted", "rolled_back")
"""The states of a rollout."""
EVENTS = ("started", "step", "promoted", "rolled_back", "paused")
"""The events ``modelloop_rollout_events_total`` counts."""
ACTIONS = ("promote", "rollback", "pause")
"""What an operator may ask of a rollout."""
# Observations a breach needs before it is judged at all (errors, labels): a handful of
# unlucky draws must not roll a good candidate back.
MIN_BREACH_SAMPLES = 10
# Latency is judged once both versions have this many calls (or step_min_requests, if
# more): a p99 over fewer calls is little more than their maximum.
LATENCY_MIN_SAMPLES = 50
# The first calls of each version in each process are left out of its latency: a version
# that has just loaded runs them while its thread pool and its batcher settle.
LATENCY_WARMUP_CALLS = 20
# Predictions read per version for the prediction drift between the versions.
PREDICTION_LIMIT = 5_000
# Labelled rows read per version; a rollout is judged on at most this many of its newest.
LABEL_LIMIT = 20_000
# Latency histogram: bucket i holds calls up to 1 µs x 1.1^(i+1).
_LATENCY_BASE_S = 1e-6
_LATENCY_GROWTH = 1.1
_LATENCY_BUCKETS = 250
# History entries kept in a rollout's document.
_HISTORY_LIMIT = 100


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of one call's latency (10 % wide)."""
    if seconds <= _LATENCY_BASE_S:
        return 0
    index = int(math.log(seconds / _LATENCY_BASE_S) / math.log(_LATENCY_GROWTH))
    return min(max(index, 0), _LATENCY_BUCKETS - 1)


def latency_floor(bucket: int) -> float:
    """The lower edge of a latency bucket, in seconds."""
    return 0.0 if bucket == 0 else _LATENCY_BASE_S * _LATENCY_GROWTH**bucket


def latency_quantile(buckets: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram (the bucket's upper edge), or None when empty."""
    total = sum(buckets.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(buckets):
        seen += buckets[bucket]
        if seen >= rank:
            return _LATENCY_BASE_S * _LATENCY_GROWTH ** (bucket + 1)
    return _LATENCY_BASE_S * _LATENCY_GROWTH ** (max(buckets) + 1)


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion; ``(0, 1)`` without observations."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_bounds(k1: int, n1: int, k2: int, n2: int, confidence: float) -> tuple[float, float]:
    """Newcombe's hybrid score bounds on ``p1 - p2``, each one-sided at ``confidence``.

    Args:
        k1: Successes of the first sample (the candidate's correct rows).
        n1: Its size.
        k2: Successes of the second sample (the champion's).
        n2: Its size.
        confidence: One-sided confidence of each bound (0.95: z = 1.645).

    Returns:
        ``(lower, upper)``: ``p1 - p2`` is above ``lower`` (and below ``upper``) with the
        given confidence.
    """
    z = NormalDist().inv_cdf(confidence)
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    p1 = k1 / n1 if n1 else 0.0
    p2 = k2 / n2 if n2 else 0.0
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


@dataclass(slots=True)
class VersionEvidence:
    """What one version of a rollout did so far: the guardrails' inputs.

    Attributes:
        requests: Model calls (shadow copies for a shadow candidate).
        errors: Failed calls.
        step_requests: Calls at the current step.
        latency: Latency histogram (bucket -> calls).
        labelled: Labelled rows of requests it answered during the rollout.
        correct: Of those, rows it got right (classifiers).
        abs_errors: Absolute errors per labelled row (regressors).
        shadow_rows: Rows of shadow copies compared.
        shadow_agreed: Of those, rows that agreed with the champion.
    """

    requests: int = 0
    errors: int = 0
    step_requests: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    labelled: int = 0
    correct: int = 0
    abs_errors: list[float] = field(default_factory=list)
    shadow_rows: int = 0
    shadow_agreed: int = 0

    @property
    def error_rate(self) -> float | None:
        """Failed calls / calls, or None before any call."""
        return self.errors / self.requests if self.requests else None

    @property
    def p99_s(self) -> float | None:
        """p99 model-call latency in seconds, or None before any call."""
        return latency_quantile(self.latency, 0.99)

    @property
    def accuracy(self) -> float | None:
        """Share of labelled rows right (classifiers), or None without labels."""
        return self.correct / self.labelled if self.labelled and not self.abs_errors else None

    @property
    def mae(self) -> float | None:
        """Mean absolute error (regressors), or None without labels."""
        return sum(self.abs_errors) / len(self.abs_errors) if self.abs_errors else None

    @property
    def agreement(self) -> float | None:
        """Share of shadow rows that agreed with the champion, or None before any."""
        return self.shadow_agreed / self.shadow_rows if self.shadow_rows else None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the guardrails say of a rollout now.

    Attributes:
        action: ``rollback`` (a breach), ``promote`` (the step passed) or ``hold``.
        reason: Why, in words.
        values: The guardrail values, for the status route.
    """

    action: str
    reason: str
    values: dict[str, Any]


def _mae_bounds(candidate: list[float], champion: list[float], confidence: float) -> tuple[float, float]:
    """Normal-approximation bounds on ``MAE(candidate) - MAE(champion)``, each one-sided."""
    z = NormalDist().inv_cdf(confidence)

    def mean_var(xs: list[float]) -> tuple[float, float]:
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)
        return mean, var

    m1, v1 = mean_var(candidate)
    m2, v2 = mean_var(champion)
    se = math.sqrt(v1 / len(candidate) + v2 / len(champion))
    return m1 - m2 - z * se, m1 - m2 + z * se


def judge(
    policy: RolloutPolicy,
    mode: str,
    champion: VersionEvidence,
    candidate: VersionEvidence,
    *,
    labels_expected: bool,
    paused: bool = False,
) -> Verdict:
    """Applies the guardrails to a rollout's evidence (see the module docstring).

    Args:
        policy: The model's rollout policy.
        mode: ``canary`` or ``shadow`` (shadow never promotes by itself).
        champion: The champion's evidence.
        candidate: The candidate's evidence.
        labels_expected: Whether labels arrive for this model (the champion has some).
        paused: An operator paused the rollout: breaches still roll back; no promotion.

    Returns:
        The verdict, with the guardrail values.
    """
    values: dict[str, Any] = {}
    breaches: list[str] = []
    waiting: list[str] = []
    # Error rate.
    z = NormalDist().inv_cdf(policy.confidence)
    rate = candidate.error_rate
    values["error_rate"] = rate
    if candidate.requests >= MIN_BREACH_SAMPLES:
        low, _ = wilson_interval(candidate.errors, candidate.requests, z)
        values["error_rate_lower"] = low
        if low > policy.max_error_rate:
            breaches.append(
                f"error rate {rate:.3f} ({candidate.errors}/{candidate.requests} calls failed; lower bound "
                f"{low:.3f} > max_error_rate {policy.max_error_rate:g})"
            )
    # Latency.
    cand_p99, champ_p99 = candidate.p99_s, champion.p99_s
    ratio = cand_p99 / champ_p99 if cand_p99 is not None and champ_p99 else None
    values["latency_ratio"] = ratio
    samples = min(sum(candidate.latency.values()), sum(champion.latency.values()))
    judged = samples >= max(policy.step_min_requests, LATENCY_MIN_SAMPLES)
    if judged and cand_p99 is not None and champ_p99:
        # The candidate's p99 is above max_latency_ratio x the champion's when more than
        # 1 % of its calls are slower than that: judged on the Wilson lower bound of that
        # share, so that a few slow calls in a small sample are not a breach.
        # Contention that slows every call of the process (a burst on a busy host) slows
        # the champion's calls in the same window too: the candidate's share of slow calls
        # is judged against the champion's share over the same limit, and a call is slow
        # only when it is also min_latency_difference_ms slower than the champion's p99.
        limit = max(
            policy.max_latency_ratio * champ_p99, champ_p99 + policy.min_latency_difference_ms / 1000.0
        )
        calls = sum(candidate.latency.values())
        slower = sum(n for b, n in candidate.latency.items() if latency_floor(b) >= limit)
        champ_calls = sum(champion.latency.values())
        champ_slower = sum(n for b, n in champion.latency.items() if latency_floor(b) >= limit)
        share_low, _ = wilson_interval(slower, calls, z)
        _, champ_high = wilson_interval(champ_slower, champ_calls, z)
        values["latency_slower_share_lower"] = share_low
        values["champion_slower_share_upper"] = champ_high
        if share_low - champ_high > 0.01:
            breaches.append(
                f"p99 latency {cand_p99 * 1000:.3f} ms, {ratio:.2f}x the champion's "
                f"{champ_p99 * 1000:.3f} ms: {slower} of {calls} calls slower than {limit * 1000:.3f} ms "
                f"(max_latency_ratio {policy.max_latency_ratio:g} x its p99, at least "
                f"{policy.min_latency_difference_ms:g} ms more), against {champ_slower} of {champ_calls} "
                f"of the champion's (lower bound {share_low:.3f} - upper bound {champ_high:.3f} > 0.01)"
            )
    # Accuracy or MAE.
    accuracy_ok = not labels_expected
    if candidate.abs_errors and champion.abs_errors:
        cand_mae, champ_mae = candidate.mae or 0.0, champion.mae or 0.0
        allowed = policy.max_mae_increase * champ_mae
        low, high = _mae_bounds(candidate.abs_errors, champion.abs_errors, policy.confidence)
        values.update(mae_difference_lower=low, mae_difference_upper=high)
        if len(candidate.abs_errors) >= MIN_BREACH_SAMPLES and low > allowed:
            breaches.append(
                f"MAE {cand_mae:.4g} vs the champion's {champ_mae:.4g}: the rise is above {allowed:.4g} "
                f"beyond doubt (lower bound {low:.4g})"
            )
        accuracy_ok = len(candidate.abs_errors) >= policy.min_labels and high <= allowed
    elif candidate.labelled and champion.labelled and not candidate.abs_errors:
        low, high = difference_bounds(
            candidate.correct, candidate.labelled, champion.correct, champion.labelled, policy.confidence
        )
        values.update(accuracy_difference_lower=low, accuracy_difference_upper=high)
        if candidate.labelled >= MIN_BREACH_SAMPLES and high < -policy.max_accuracy_drop:
            breaches.append(
                f"accuracy {candidate.accuracy:.3f} vs the champion's {champion.accuracy:.3f}: worse by more "
                f"than max_accuracy_drop {policy.max_accuracy_drop:g} beyond doubt (upper bound of the "
                f"difference {high:.3f})"
            )
        accuracy_ok = candidate.labelled >= policy.min_labels and low >= -policy.max_accuracy_drop
    if labels_expected and not accuracy_ok:
        waiting.append(
            f"labels: {candidate.labelled}/{policy.min_labels}, or the accuracy bound is not yet within "
            f"max_accuracy_drop"
        )
    if breaches:
        return Verdict("rollback", "; ".join(breaches), values)
    if mode == "shadow":
        return Verdict(
            "hold", "shadow mode: the candidate answers copies; promote it to start a canary", values
        )
    if paused:
        return Verdict("hold", "paused by an operator", values)
    if candidate.step_requests < policy.step_min_requests:
        waiting.insert(0, f"requests at this step: {candidate.step_requests}/{policy.step_min_requests}")
    if not judged:
        waiting.append(f"latency samples: {samples}/{max(policy.step_min_requests, LATENCY_MIN_SAMPLES)}")
    if rate is not None and rate > policy.max_error_rate:
        waiting.append(f"error rate {rate:.3f} > {policy.max_error_rate:g}")
    if waiting:
        return Verdict("hold", "waiting for " + "; ".join(waiting), values)
    return Verdict("promote", "the guardrails pass", values)


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


def current_share(state: dict[str, Any]) -> float:
    """The candidate's share of unpinned traffic, in percent, in a rollout state."""
    if state.get("state") != "canary" or state.get("candidate") is None:
        return 0.0
    steps = state.get("steps") or [100.0]
    return float(steps[min(int(state.get("step", 0)), len(steps) - 1)])


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
    ) -> None:
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
        self._assignments = {model: _assignment(doc.state) for model, doc in docs.items()}
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
        state["guardrails"] = _guardrail_values(evidence, champion, candidate, verdict)
        state["guardrails"][str(candidate)]["prediction_drift"] = self._prediction_drift(
            model, champion, candidate, float(doc.state["started"])
        )
        state["evaluated"] = now
        if verdict.action == "rollback":
            self._write(model, doc, _rolled_back(state, verdict.reason, now), "rolled_back")
        elif verdict.action == "promote":
            self._write(model, doc, _advanced(state, now, "the guardrails passed"), None)
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
        _note(
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
        self._assignments[model] = _assignment(state)
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
            _score(ev, rows, self.task_of(model, version))
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
                new, event = _apply(state, action, t)
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


def _retired_why(state: dict[str, Any], version: str, reason: str) -> str:
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


def _score(ev: VersionEvidence, rows: list[LabelledRow], task: str) -> None:
    ev.labelled = len(rows)
    if task in CLASSIFIER_TASKS:
        ev.correct = sum(1 for r in rows if int(r.predicted) == int(r.target))
    else:
        ev.abs_errors = [abs(float(r.predicted) - float(r.target)) for r in rows]


def _assignment(state: dict[str, Any]) -> RolloutAssignment:
    return RolloutAssignment(
        champion=int(state.get("champion", 0)),
        candidate=state.get("candidate"),
        mode=str(state.get("mode", "canary")),
        share=current_share(state),
        state=str(state.get("state", "")),
        retired=frozenset(int(v) for v in state.get("retired", {})),
        retired_why={
            int(v): _retired_why(state, str(v), str(reason)) for v, reason in state.get("retired", {}).items()
        },
    )


def _note(state: dict[str, Any], now: float, event: str, reason: str) -> None:
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


def _rolled_back(state: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    candidate = state["candidate"]
    state["state"] = "rolled_back"
    state["paused"] = False
    retired = dict(state.get("retired", {}))
    retired[str(candidate)] = reason
    state["retired"] = retired
    state["retired_at"] = {**state.get("retired_at", {}), str(candidate): now}
    state["retired_by"] = {**state.get("retired_by", {}), str(candidate): state.get("id")}
    _note(state, now, "rolled_back", f"version {candidate} RETIRED: {reason}")
    logger.warning("model %s: version %s rolled back: %s", state.get("model"), candidate, reason)
    return state


def _advanced(state: dict[str, Any], now: float, why: str) -> dict[str, Any]:
    steps = state.get("steps") or [100.0]
    if state["state"] == "shadow":
        state["state"], state["step"] = "canary", 0
    elif int(state["step"]) + 1 < len(steps):
        state["step"] = int(state["step"]) + 1
    else:
        old, new = state["champion"], state["candidate"]
        state["state"], state["champion"], state["candidate"] = "promoted", new, None
        state["previous_champion"] = old
        _note(state, now, "promoted", f"version {new} is the champion ({why}); version {old} unloads")
        logger.info("model %s: version %s promoted over %s", state.get("model"), new, old)
        return state
    state["step_started"] = now
    state["paused"] = False
    _note(
        state,
        now,
        "step",
        f"step {int(state['step']) + 1}: {current_share(state):g} % to version {state['candidate']} ({why})",
    )
    return state


def _apply(state: dict[str, Any], action: str, now: float) -> tuple[dict[str, Any], str | None]:
    current = state.get("state")
    if action == "rollback":
        if current not in ("canary", "shadow"):
            raise ServiceError(
                f"the rollout is {current}; only a running one can be rolled back",
                ErrorCode.FAILED_PRECONDITION,
            )
        return _rolled_back(state, "rolled back by an operator", now), "rolled_back"
    if action == "pause":
        if current not in ("canary", "shadow"):
            raise ServiceError(
                f"the rollout is {current}; only a running one can be paused", ErrorCode.FAILED_PRECONDITION
            )
        state["paused"] = True
        _note(
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
        _note(
            state,
            now,
            "step",
            f"version {candidate} restored by an operator: canary at {current_share(state):g} %",
        )
        return state, None
    return _advanced(state, now, "promoted by an operator"), None


def _guardrail_values(
    evidence: dict[int, VersionEvidence], champion: int, candidate: int, verdict: Verdict
) -> dict[str, Any]:
    def version_values(version: int, role: str) -> dict[str, Any]:
        ev = evidence.get(version, VersionEvidence())
        return {
            "role": role,
            "requests": ev.requests,
            "step_requests": ev.step_requests,
            "errors": ev.errors,
            "error_rate": ev.error_rate,
            "p99_latency_s": ev.p99_s,
            "labels": ev.labelled,
            "accuracy": ev.accuracy,
            "mae": ev.mae,
            "shadow_rows": ev.shadow_rows,
            "agreement": ev.agreement,
        }

    values = {
        str(champion): version_values(champion, "champion"),
        str(candidate): version_values(candidate, "candidate"),
    }
    values[str(candidate)].update({k: v for k, v in verdict.values.items() if k != "error_rate"})
    values[str(candidate)]["verdict"] = verdict.action
    return values


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
