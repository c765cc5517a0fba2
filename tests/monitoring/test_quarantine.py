"""The label checks: which sources are quarantined, on counts shaped like real labelling."""

from __future__ import annotations

import numpy as np
import pytest

from modelloop.monitoring.quarantine import Champion, assess_sources, wilson_lower
from modelloop.monitoring.settings import QuarantineSettings, resolve_quarantine
from modelloop.monitoring.stores.records import SourceStat

# A digits champion: 2.2 % test error, a flat prediction mix.
CHAMPION = Champion(1, error=0.022, prediction_proportions=np.full(10, 0.1), labels=tuple("0123456789"))


def labelled(
    source: str, per_class: int = 80, flip: dict[int, int] | None = None, confidence: int = 99
) -> list[SourceStat]:
    """``per_class`` confident labels per predicted class; ``flip`` relabels a class as another."""
    flip = flip or {}
    return [SourceStat(1, source, c, flip.get(c, c), confidence, per_class) for c in range(10)]


def verdicts(*groups: list[SourceStat], settings: QuarantineSettings | None = None):
    stats = [s for group in groups for s in group]
    return assess_sources(stats, CHAMPION, settings or QuarantineSettings())


def test_an_honest_source_is_trusted_and_its_agreement_reported():
    honest = [*labelled("team-a"), SourceStat(1, "team-a", 5, 6, 99, 3), SourceStat(1, "team-a", 2, 7, 40, 5)]
    (verdict,) = verdicts(honest).values()
    assert not verdict.quarantined and verdict.reasons == []
    # The unconfident relabel (40 %) counts as a label but not as a disagreement.
    assert verdict.labels == 808 and verdict.confident == 803 and verdict.disagreements == 3
    assert verdict.agreement == pytest.approx(800 / 803)
    assert verdict.relabels == [{"predicted": "5", "target": "6", "labels": 3, "rate": round(3 / 83, 4)}]


def test_a_targeted_flip_from_a_lone_source_is_quarantined():
    (verdict,) = verdicts(labelled("mallory", flip={3: 8})).values()
    assert verdict.quarantined
    assert verdict.reasons == ["relabels 100% of the champion's confident '3' predictions as '8' (80 labels)"]


def test_a_flood_of_wrong_labels_exceeds_what_the_test_error_allows():
    (verdict,) = verdicts(labelled("flood", flip={c: (c + 3) % 10 for c in range(10)})).values()
    assert verdict.quarantined
    assert any("its test error (2.2%) allows at most 9.4%" in r for r in verdict.reasons)


def test_a_source_far_worse_than_the_others_is_quarantined():
    # 8 % spread over many pairs: under the test-error allowance of this lax champion and
    # no pair dominates, but far above the other sources' 0 %.
    champion = Champion(1, error=0.2, prediction_proportions=np.full(10, 0.1))
    sloppy = labelled("sloppy", per_class=92) + [
        SourceStat(1, "sloppy", c, (c + 1) % 10, 99, 8) for c in range(10)
    ]
    stats = sloppy + labelled("team-a") + labelled("team-b")
    result = assess_sources(stats, champion, QuarantineSettings())
    assert result["sloppy"].quarantined and not result["team-a"].quarantined
    assert result["sloppy"].reasons == [
        "disagrees with 8.0% of the champion's confident predictions; the other sources with 0.0%"
    ]


def test_drifted_inputs_pause_the_rate_checks_for_an_honest_source():
    # The simulate demo: half normal digits, half inverted ones the champion calls a
    # confident 3; the honest labels disagree with 45 % of confident predictions.
    drifted = labelled("default", per_class=20) + [SourceStat(1, "default", 3, c, 100, 20) for c in range(10)]
    (verdict,) = verdicts(drifted).values()
    assert not verdict.quarantined, verdict.reasons
    assert verdict.prediction_psi is not None and verdict.prediction_psi > 0.2
    assert "rate checks paused" in verdict.notes[0]


def test_a_pair_that_every_source_relabels_is_the_champions_error_not_a_labelers():
    a = labelled("team-a", flip={7: 1})
    b = labelled("team-b", flip={7: 1})
    result = verdicts(a, b)
    assert not result["team-a"].quarantined and not result["team-b"].quarantined


def test_too_few_labels_get_no_verdict_and_checks_can_be_turned_off():
    (few,) = verdicts(labelled("new", per_class=4, flip={3: 8})).values()
    assert not few.quarantined and "checks start at 50" in few.notes[0]
    (off,) = verdicts(labelled("mallory", flip={3: 8}), settings=QuarantineSettings(enabled=False)).values()
    assert not off.quarantined and off.reasons  # reported, not enforced
    lax = QuarantineSettings(pair_rate=1.0, min_pair_labels=100)
    (unseen,) = verdicts(labelled("mallory", flip={3: 8}), settings=lax).values()
    assert not unseen.quarantined


def test_confidence_threshold_decides_which_labels_count():
    shaky = labelled("mallory", flip={3: 8}, confidence=85)
    (counted,) = verdicts(shaky, settings=QuarantineSettings(confidence=0.8)).values()
    (ignored,) = verdicts(shaky).values()
    assert counted.quarantined and ignored.confident == 0 and not ignored.quarantined


def test_wilson_lower_bound():
    assert wilson_lower(0, 0) == 0.0 and wilson_lower(0, 100) == pytest.approx(0.0, abs=1e-12)
    assert 0.04 < wilson_lower(10, 100) < 0.1
    assert wilson_lower(100, 1000) > wilson_lower(10, 100)  # more evidence, tighter bound


def test_per_model_overrides_are_checked():
    base = QuarantineSettings()
    assert resolve_quarantine(base, {"pair_rate": 0.6}).pair_rate == 0.6
    assert resolve_quarantine(base, {}) is base
    with pytest.raises(ValueError, match="invalid feedback settings: pair_rate"):
        resolve_quarantine(base, {"pair_rate": 2})
    with pytest.raises(ValueError, match="pair_ratee"):
        resolve_quarantine(base, {"pair_ratee": 0.5})
