"""The guardrails a rollout is judged on, over everything it served so far (every worker's):

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from modelloop.monitoring.stores.records import CLASSIFIER_TASKS, LabelledRow
from modelloop.serving.types import RolloutPolicy

# Observations a breach needs before it is judged at all (errors, labels): a handful of
# unlucky draws must not roll a good candidate back.
MIN_BREACH_SAMPLES = 10
# Latency is judged once both versions have this many calls (or step_min_requests, if
# more): a p99 over fewer calls is little more than their maximum.
LATENCY_MIN_SAMPLES = 50
# Latency histogram: bucket i holds calls up to 1 µs x 1.1^(i+1).
_LATENCY_BASE_S = 1e-6
_LATENCY_GROWTH = 1.1
_LATENCY_BUCKETS = 250


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
    def p50_s(self) -> float | None:
        """Median model-call latency in seconds, or None before any call."""
        return latency_quantile(self.latency, 0.5)

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


@dataclass(frozen=True, slots=True)
class _SlowCalls:
    """Both versions' calls slower than a limit drawn from one of the champion's quantiles."""

    limit: float
    calls: int
    slower: int
    champion_calls: int
    champion_slower: int
    share_low: float
    champion_high: float

    @classmethod
    def over(
        cls,
        policy: RolloutPolicy,
        champion: VersionEvidence,
        candidate: VersionEvidence,
        quantile: float,
        z: float,
    ) -> _SlowCalls:
        """Calls slower than ``max_latency_ratio`` x ``quantile`` and ``min_latency_difference_ms`` more."""
        limit = max(policy.max_latency_ratio * quantile, quantile + policy.min_latency_difference_ms / 1000.0)
        calls = sum(candidate.latency.values())
        slower = sum(n for b, n in candidate.latency.items() if latency_floor(b) >= limit)
        champ_calls = sum(champion.latency.values())
        champ_slower = sum(n for b, n in champion.latency.items() if latency_floor(b) >= limit)
        share_low, _ = wilson_interval(slower, calls, z)
        _, champ_high = wilson_interval(champ_slower, champ_calls, z)
        return cls(limit, calls, slower, champ_calls, champ_slower, share_low, champ_high)

    def describe(self, policy: RolloutPolicy, quantile: str) -> str:
        """The counts, in words."""
        return (
            f"{self.slower} of {self.calls} calls slower than {self.limit * 1000:.3f} ms "
            f"(max_latency_ratio {policy.max_latency_ratio:g} x its {quantile}, at least "
            f"{policy.min_latency_difference_ms:g} ms more), against {self.champion_slower} of "
            f"{self.champion_calls} of the champion's"
        )


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
        slow = _SlowCalls.over(policy, champion, candidate, champ_p99, z)
        values["latency_slower_share_lower"] = slow.share_low
        values["champion_slower_share_upper"] = slow.champion_high
        if slow.share_low - slow.champion_high > 0.01:
            breaches.append(
                f"p99 latency {cand_p99 * 1000:.3f} ms, {ratio:.2f}x the champion's "
                f"{champ_p99 * 1000:.3f} ms: {slow.describe(policy, 'p99')} (lower bound "
                f"{slow.share_low:.3f} - upper bound {slow.champion_high:.3f} > 0.01)"
            )
    # The typical call. A busy host slows the tail of both versions (a p99 over a few
    # hundred calls is a handful of them), but not the median: a candidate whose calls are
    # slower most of the time is slow whatever the host does. Breach: more than half of
    # its calls beyond doubt, and a quarter more than the champion's share, are slower
    # than max_latency_ratio x the champion's median (and min_latency_difference_ms more).
    cand_p50, champ_p50 = candidate.p50_s, champion.p50_s
    values["median_latency_ratio"] = cand_p50 / champ_p50 if cand_p50 is not None and champ_p50 else None
    if judged and cand_p50 is not None and champ_p50:
        slow = _SlowCalls.over(policy, champion, candidate, champ_p50, z)
        if slow.share_low > 0.5 and slow.share_low - slow.champion_high > 0.25:
            breaches.append(
                f"median latency {cand_p50 * 1000:.3f} ms, {cand_p50 / champ_p50:.2f}x the champion's "
                f"{champ_p50 * 1000:.3f} ms: {slow.describe(policy, 'median')}"
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


def score_labels(ev: VersionEvidence, rows: list[LabelledRow], task: str) -> None:
    """Counts a version's labelled rows into its evidence: correct answers, or absolute errors."""
    ev.labelled = len(rows)
    if task in CLASSIFIER_TASKS:
        ev.correct = sum(1 for r in rows if int(r.predicted) == int(r.target))
    else:
        ev.abs_errors = [abs(float(r.predicted) - float(r.target)) for r in rows]


def guardrail_values(
    evidence: dict[int, VersionEvidence], champion: int, candidate: int, verdict: Verdict
) -> dict[str, Any]:
    """The guardrails' figures of both versions and the verdict, as the state document keeps them."""

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
