"""When an alert may start a retrain: de-duplication, cooldown per model, resolved alerts, and
whether there is anything new to learn from (:class:`NewLabelsGate`).

Alertmanager re-sends a firing group every ``repeat_interval`` with the same group key
and start time, and several replicas or rules may call for the same model at once. The
policy turns that stream into at most one retrain per model per cooldown.

Example:

```python
policy = RetrainPolicy(cooldown_s=900)
policy.should_retrain("digits", "ModelDriftDetected", ("{}:{alertname=...}", "2024-01-01T00:00:00Z"))
```
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from modelloop.errors import ServiceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyDecision:
    """Whether to start a retrain, and why (for the webhook's answer and the log).

    Attributes:
        start: Start a retrain now.
        why: ``"started"``, ``"duplicate"``, ``"resolved"`` or ``"cooldown (N s left)"``.
    """

    start: bool
    why: str

    def __bool__(self) -> bool:
        return self.start


class RetrainPolicy:
    """Decides whether an alert (or an in-process rule) starts a retrain.

    Thread-safe: the webhook and the in-process rules may consult one policy from
    different threads. With a ``ledger``, several processes share one policy (the
    workers of one server: an alert reaches whichever worker the connection landed on):
    each decision reads and writes the ledger file under an exclusive ``flock``.

    Args:
        cooldown_s: Least seconds between two retrains of one model.
        cooldown_for: Per-model cooldown (from ``config.json``); returns None to use
            ``cooldown_s``. Defaults to None.
        clock: Monotonic clock in seconds. Defaults to ``time.monotonic``.
        max_keys: De-duplication keys remembered; the oldest are forgotten first.
            Defaults to 10000.
        ledger: A JSON file that holds the starts and keys for several processes; use a
            ``clock`` that all of them share (``time.time``). Defaults to None (this
            process only).
    """

    def __init__(
        self,
        cooldown_s: float,
        *,
        cooldown_for: Callable[[str], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
        ledger: Path | None = None,
    ) -> None:
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self._cooldown_s = cooldown_s
        self._cooldown_for = cooldown_for
        self._clock = clock
        self._max_keys = max_keys
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._last_start: dict[str, float] = {}
        self._lock = threading.Lock()
        self._ledger = ledger

    def cooldown(self, model: str) -> float:
        """The cooldown of one model in seconds."""
        if self._cooldown_for is not None:
            value = self._cooldown_for(model)
            if value is not None:
                return value
        return self._cooldown_s

    def should_retrain(
        self, model: str, reason: str, key: Hashable | None = None, *, resolved: bool = False
    ) -> PolicyDecision:
        """Decides, and on "start" records the start so the next call sees the cooldown.

        Args:
            model: The model to retrain.
            reason: Why (alert name or in-process rule); kept for symmetry with the log.
            key: De-duplication key: ``(groupKey, startsAt)`` for Alertmanager alerts.
                A key already seen is a duplicate, even after its cooldown. None = no
                de-duplication (in-process rules rely on the cooldown alone).
            resolved: The alert is resolved; resolved alerts never start a retrain.

        Returns:
            The decision.
        """
        del reason  # Same decision whatever the reason; callers log it.
        if resolved:
            return PolicyDecision(False, "resolved")
        with self._lock, self._shared():
            if key is not None and key in self._seen:
                return PolicyDecision(False, "duplicate")
            now = self._clock()
            last = self._last_start.get(model)
            cooldown = self.cooldown(model)
            if last is not None and now - last < cooldown:
                # The key is remembered, so the same alert re-sent after the cooldown does
                # not start a second run either.
                self._remember(key)
                return PolicyDecision(False, f"cooldown ({cooldown - (now - last):.0f} s left)")
            self._remember(key)
            self._last_start[model] = now
            return PolicyDecision(True, "started")

    def forget(self, model: str) -> None:
        """Lifts the cooldown of one model (its retrain could not even start)."""
        with self._lock, self._shared():
            self._last_start.pop(model, None)

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        """Loads the ledger's state, lets the caller decide, and writes it back, all under flock."""
        if self._ledger is None:
            yield
            return
        self._ledger.parent.mkdir(parents=True, exist_ok=True)
        with self._ledger.open("a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                text = handle.read()
                state = json.loads(text) if text.strip() else {}
                self._last_start = {str(m): float(t) for m, t in state.get("last_start", {}).items()}
                self._seen = OrderedDict(
                    (tuple(k) if isinstance(k, list) else k, None) for k in state.get("seen", [])
                )
                yield
                seen = [list(k) if isinstance(k, tuple) else k for k in self._seen]
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps({"last_start": self._last_start, "seen": seen}))
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remember(self, key: Hashable | None) -> None:
        if key is None:
            return
        self._seen[key] = None
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)


DRIFT_REASONS = (
    "ModelDriftDetected",
    "ModelPredictionDrift",
    "inprocess:ModelDriftDetected",
    "inprocess:ModelPredictionDrift",
)
"""Alerts (and in-process rules) about inputs or outputs, which labels alone can answer."""


class TrustedLabels(Protocol):
    """What :class:`NewLabelsGate` reads of the labels (the feedback store)."""

    def trusted_labels_since(self, model: str, since: float, exclude_sources: Collection[str]) -> int:
        """Labelled rows of a model stored after ``since`` by sources not excluded."""
        ...


class RetrainTimes(Protocol):
    """What :class:`NewLabelsGate` reads of the retrain reports (the retrain report store)."""

    def last_retrain_time(self, model: str) -> float | None:
        """When the newest retrain report of a model was kept, or None without one."""
        ...


@dataclass(frozen=True)
class Skip:
    """The last drift alert a model's gate turned away: when and why (for the health page)."""

    at: float
    reason: str
    why: str


class NewLabelsGate:
    """Lets a drift alert start a retrain only when trusted labels arrived since the last retrain.

    Drift says the inputs changed; a retrain learns about the new inputs only from labels of
    them. Without new trusted labels a retrain would train on what the last one had, so the
    alert is turned away, logged, counted (``modelloop_retrain_skipped_total``) and shown on
    the health page. Alerts on accuracy are let through: they come from labels.

    Args:
        labels: Where labels are kept.
        reports: Where retrain reports are kept.
        quarantined: The quarantined sources of a model (their labels do not count).
        on_skip: Called with ``(model, reason)`` when an alert is turned away. Defaults to None.
        clock: Wall-clock time. Defaults to ``time.time``.
    """

    def __init__(
        self,
        labels: TrustedLabels,
        reports: RetrainTimes,
        quarantined: Callable[[str], Collection[str]],
        *,
        on_skip: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._labels = labels
        self._reports = reports
        self._quarantined = quarantined
        self._on_skip = on_skip
        self._clock = clock
        self.skipped: dict[str, Skip] = {}

    def check(self, model: str, reason: str) -> str | None:
        """None to go on, or why this alert starts no retrain.

        A store that cannot be read lets the alert through: the retrain reads the same
        store and fails with a clear reason if it is still down.
        """
        if reason not in DRIFT_REASONS:
            return None
        try:
            since = self._reports.last_retrain_time(model) or 0.0
            fresh = self._labels.trusted_labels_since(model, since, sorted(self._quarantined(model)))
        except ServiceError as exc:  # the store is down: the gate must not break the alert path
            logger.warning(
                "retrain gate for %s: cannot read the labels (%s); letting the alert through", model, exc
            )
            return None
        if fresh > 0:
            return None
        when = "the last retrain" if since else "the model was first served"
        why = f"no new trusted labels since {when}: a retrain could learn nothing about the drifted inputs"
        self.skipped[model] = Skip(self._clock(), reason, why)
        logger.info("%s for %s starts no retrain: %s", reason, model, why)
        if self._on_skip is not None:
            self._on_skip(model, reason)
        return why
