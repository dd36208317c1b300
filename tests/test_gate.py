from __future__ import annotations

import numpy as np
import pytest

from continual.config import GateSettings
from continual.gate import Decision, Scores, decide, mcnemar_exact


def correct(n: int, k: int, seed: int = 0) -> np.ndarray:
    """n results of which exactly k are correct, in a seeded order."""
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return out


GATE = GateSettings(min_holdout_samples=20, min_new_improvement=0.0, max_old_forgetting=0.02, significance=0.0)


def test_mcnemar_against_a_hand_computed_example() -> None:
    # b = 10, c = 2: P(X >= 10 | n = 12, p = 1/2) = (66 + 12 + 1) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(79 / 4096)
    # The reverse direction: P(X >= 2 | n = 12) = 1 - (1 + 12) / 4096.
    assert mcnemar_exact(2, 10) == pytest.approx(1 - 13 / 4096)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(1 / 32)
    with pytest.raises(ValueError, match="b and c"):
        mcnemar_exact(-1, 0)


def test_promotes_when_every_rule_passes() -> None:
    champ = Scores(correct(100, 90), correct(100, 50))
    cand = Scores(champ.old_correct, correct(100, 80, seed=1))
    d = decide(cand, champ, GATE)
    assert d.outcome == "promoted" and d.rule == "all_rules_passed"
    assert d.metrics["candidate_new_accuracy"] == 0.8 and d.metrics["champion_new_accuracy"] == 0.5


def test_min_new_improvement_rule_and_its_direction() -> None:
    gate = GATE.model_copy(update={"min_new_improvement": 0.05})
    old = correct(100, 90)
    champ = Scores(old, correct(100, 60))
    # 0.64 < 0.60 + 0.05: rejected by the new-improvement rule.
    d = decide(Scores(old, correct(100, 64, seed=2)), champ, gate)
    assert (d.outcome, d.rule) == ("rejected", "min_new_improvement")
    # Exactly at the threshold passes, and every higher accuracy passes too.
    for k in range(65, 101):
        assert decide(Scores(old, correct(100, k, seed=k)), champ, gate).outcome == "promoted", k


def test_max_old_forgetting_rule_and_its_direction() -> None:
    champ = Scores(correct(100, 90), correct(100, 50))
    new = correct(100, 80)
    d = decide(Scores(correct(100, 87, seed=3), new), champ, GATE)
    assert (d.outcome, d.rule) == ("rejected", "max_old_forgetting")
    assert "0.8700 < champion's 0.9000" in d.reasons[-1]
    for k in range(88, 101):  # 0.88 = 0.90 - 0.02 passes; higher never fails
        assert decide(Scores(correct(100, k, seed=k), new), champ, GATE).outcome == "promoted", k


def test_significance_rule() -> None:
    gate = GATE.model_copy(update={"significance": 0.05})
    old = correct(100, 90)
    champ_new = np.zeros(100, dtype=bool)
    champ_new[:50] = True
    champ = Scores(old, champ_new)
    # Candidate fixes 3 samples and breaks 1: not significant.
    small = champ_new.copy()
    small[50:53] = True
    small[0] = False
    d = decide(Scores(old, small), champ, gate)
    assert (d.outcome, d.rule) == ("rejected", "significance")
    assert d.metrics["mcnemar_b"] == 3 and d.metrics["mcnemar_c"] == 1
    # Fixes 20, breaks 2: significant.
    big = champ_new.copy()
    big[50:70] = True
    big[:2] = False
    d = decide(Scores(old, big), champ, gate)
    assert d.outcome == "promoted" and d.metrics["mcnemar_p_value"] < 0.05


def test_too_few_holdout_samples_defers() -> None:
    champ = Scores(correct(100, 90), correct(10, 5))
    d = decide(Scores(champ.old_correct, correct(10, 10)), champ, GATE)
    assert (d.outcome, d.rule) == ("deferred", "min_holdout_samples")


def test_bootstrap_floor() -> None:
    gate = GATE.model_copy(update={"min_accuracy": 0.7})
    d = decide(Scores(np.array([], bool), correct(50, 34)), None, gate)
    assert (d.outcome, d.rule) == ("rejected", "min_accuracy")
    d = decide(Scores(np.array([], bool), correct(50, 35)), None, gate)
    assert (d.outcome, d.rule) == ("promoted", "bootstrap")
    d = decide(Scores(np.array([], bool), correct(10, 10)), None, gate)
    assert (d.outcome, d.rule) == ("deferred", "min_holdout_samples")


def test_shadow_records_but_never_promotes() -> None:
    gate = GATE.model_copy(update={"shadow": True})
    champ = Scores(correct(100, 90), correct(100, 50))
    d = decide(Scores(champ.old_correct, correct(100, 95)), champ, gate)
    assert d.outcome == "rejected" and d.rule == "shadow" and d.shadow and not d.promote
    assert any("would" in r or "shadow" in r for r in d.reasons)
    bad = decide(Scores(champ.old_correct, correct(100, 10)), champ, gate)
    assert bad.rule == "min_new_improvement" and bad.shadow


def test_mismatched_holdouts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^candidate and champion must be scored on the same holdout samples$"):
        decide(Scores(correct(10, 5), correct(10, 5)), Scores(correct(11, 5), correct(10, 5)), GATE)


# -- boundaries: each rule is pinned at its exact threshold, on both sides -------------------------------
def test_old_holdout_minimum_is_exact() -> None:
    """n_old = min − 1 defers (even though every other rule would pass); n_old = min decides."""
    champ_new, cand_new = correct(100, 50), correct(100, 80, seed=1)
    for n_old, outcome in [(0, "deferred"), (19, "deferred"), (20, "promoted")]:
        old = np.ones(n_old, dtype=bool)
        d = decide(Scores(old, cand_new), Scores(old, champ_new), GATE)
        assert d.outcome == outcome, (n_old, d)
        assert d.metrics["n_old"] == n_old
    # An empty old holdout has no accuracy: it never slips through the forgetting rule as NaN.
    d = decide(Scores(np.array([], bool), cand_new), Scores(np.array([], bool), champ_new), GATE)
    assert (d.outcome, d.rule) == ("deferred", "min_holdout_samples")
    assert d.reasons == ["holdouts have 0 old and 100 new samples, each needs 20"]


def test_new_holdout_minimum_is_exact() -> None:
    old = correct(100, 90)
    for n_new, outcome in [(19, "deferred"), (20, "promoted")]:
        d = decide(Scores(old, np.ones(n_new, bool)), Scores(old, np.zeros(n_new, bool)), GATE)
        assert d.outcome == outcome, (n_new, d)


def test_bootstrap_holdout_minimum_is_exact() -> None:
    for n, outcome in [(19, "deferred"), (20, "promoted")]:
        d = decide(Scores(np.array([], bool), np.ones(n, bool)), None, GATE)
        assert d.outcome == outcome, (n, d)
    # Old and new together count at bootstrap: 10 + 10 reaches the minimum.
    assert decide(Scores(np.ones(10, bool), np.ones(10, bool)), None, GATE).outcome == "promoted"


def test_significance_boundary_is_strict() -> None:
    """p == significance rejects ("p < significance" is the rule); the next float above p promotes."""
    old = correct(100, 90)
    champ_new = np.zeros(100, dtype=bool)
    cand_new = champ_new.copy()
    cand_new[:5] = True  # b = 5, c = 0: p = 1/32 exactly
    p = mcnemar_exact(5, 0)
    assert p == 1 / 32
    at = decide(Scores(old, cand_new), Scores(old, champ_new), GATE.model_copy(update={"significance": p}))
    assert (at.outcome, at.rule) == ("rejected", "significance")
    assert at.metrics["mcnemar_p_value"] == p
    assert "is not < significance" in at.reasons[-1]
    above = np.nextafter(p, 1.0)
    passed = decide(Scores(old, cand_new), Scores(old, champ_new), GATE.model_copy(update={"significance": above}))
    assert (passed.outcome, passed.rule) == ("promoted", "all_rules_passed")
    # And a p-value well over the level still rejects (the direction of the comparison).
    loose = decide(Scores(old, cand_new), Scores(old, champ_new), GATE.model_copy(update={"significance": 0.01}))
    assert loose.rule == "significance"
    # significance = 0 switches the test off: no McNemar figures at all.
    off = decide(Scores(old, cand_new), Scores(old, champ_new), GATE)
    assert off.promote and "mcnemar_p_value" not in off.metrics


# -- golden decisions: every path's outcome, rule, reasons and metrics, exactly (they are the audit trail) ------
GOLDEN_GATE = GateSettings(
    min_holdout_samples=4, min_new_improvement=0.1, max_old_forgetting=0.25, significance=0.0, min_accuracy=0.5
)
T, F = True, False


@pytest.mark.parametrize(
    ("candidate", "champion", "gate", "expected"),
    [
        pytest.param(
            Scores([], [T, F, T]), None, GOLDEN_GATE,
            Decision("deferred", "min_holdout_samples", ["holdout has 3 samples, needs 4"],
                     {"candidate_old_accuracy": None, "candidate_new_accuracy": 2 / 3, "n_old": 0, "n_new": 3}),
            id="bootstrap-defers",
        ),
        pytest.param(
            Scores([F, F], [T, F]), None, GOLDEN_GATE,
            Decision("rejected", "min_accuracy", ["accuracy 0.2500 < min_accuracy 0.5"],
                     {"candidate_old_accuracy": 0.0, "candidate_new_accuracy": 0.5, "n_old": 2, "n_new": 2,
                      "candidate_accuracy": 0.25}),
            id="bootstrap-rejects",
        ),
        pytest.param(
            Scores([T, F], [T, T]), None, GOLDEN_GATE,
            Decision("promoted", "bootstrap", ["first champion: accuracy 0.7500 >= min_accuracy 0.5"],
                     {"candidate_old_accuracy": 0.5, "candidate_new_accuracy": 1.0, "n_old": 2, "n_new": 2,
                      "candidate_accuracy": 0.75}),
            id="bootstrap-promotes",
        ),
        pytest.param(
            Scores([T, T, T], [T, T, T, T]), Scores([T, T, T], [F, F, F, F]), GOLDEN_GATE,
            Decision("deferred", "min_holdout_samples", ["holdouts have 3 old and 4 new samples, each needs 4"],
                     {"candidate_old_accuracy": 1.0, "candidate_new_accuracy": 1.0, "n_old": 3, "n_new": 4,
                      "champion_old_accuracy": 1.0, "champion_new_accuracy": 0.0}),
            id="defers",
        ),
        pytest.param(
            Scores([T, T, T, T], [T, T, F, F]), Scores([T, T, T, T], [T, F, F, F]),
            GOLDEN_GATE.model_copy(update={"min_new_improvement": 0.3}),
            Decision("rejected", "min_new_improvement", ["new-holdout accuracy 0.5000 < champion's 0.2500 + 0.3"],
                     {"candidate_old_accuracy": 1.0, "candidate_new_accuracy": 0.5, "n_old": 4, "n_new": 4,
                      "champion_old_accuracy": 1.0, "champion_new_accuracy": 0.25}),
            id="rejects-new",
        ),
        pytest.param(
            Scores([T, F, F, F], [T, T, T, F]), Scores([T, T, T, F], [T, F, F, F]), GOLDEN_GATE,
            Decision("rejected", "max_old_forgetting",
                     ["new-holdout accuracy 0.7500 >= champion's 0.2500 + 0.1",
                      "old-holdout accuracy 0.2500 < champion's 0.7500 − 0.25"],
                     {"candidate_old_accuracy": 0.25, "candidate_new_accuracy": 0.75, "n_old": 4, "n_new": 4,
                      "champion_old_accuracy": 0.75, "champion_new_accuracy": 0.25}),
            id="rejects-old",
        ),
        pytest.param(
            Scores([T, T, F, F], [T, T, T, F]), Scores([T, T, T, F], [T, F, F, F]),
            GOLDEN_GATE.model_copy(update={"significance": 0.2}),
            Decision("rejected", "significance",
                     ["new-holdout accuracy 0.7500 >= champion's 0.2500 + 0.1",
                      "old-holdout accuracy 0.5000 >= champion's 0.7500 − 0.25",
                      "McNemar p = 0.25 (b=2, c=0) is not < significance 0.2"],
                     {"candidate_old_accuracy": 0.5, "candidate_new_accuracy": 0.75, "n_old": 4, "n_new": 4,
                      "champion_old_accuracy": 0.75, "champion_new_accuracy": 0.25,
                      "mcnemar_b": 2, "mcnemar_c": 0, "mcnemar_p_value": 0.25}),
            id="rejects-significance",
        ),
        pytest.param(
            Scores([T, T, F, F], [T, T, T, F]), Scores([T, T, T, F], [T, F, F, F]),
            GOLDEN_GATE.model_copy(update={"significance": 0.3}),
            Decision("promoted", "all_rules_passed",
                     ["new-holdout accuracy 0.7500 >= champion's 0.2500 + 0.1",
                      "old-holdout accuracy 0.5000 >= champion's 0.7500 − 0.25",
                      "McNemar p = 0.25 (b=2, c=0) < 0.3"],
                     {"candidate_old_accuracy": 0.5, "candidate_new_accuracy": 0.75, "n_old": 4, "n_new": 4,
                      "champion_old_accuracy": 0.75, "champion_new_accuracy": 0.25,
                      "mcnemar_b": 2, "mcnemar_c": 0, "mcnemar_p_value": 0.25}),
            id="promotes",
        ),
        pytest.param(
            Scores([T, T, T, T], [T, T, T, F]), Scores([T, T, T, F], [T, F, F, F]),
            GOLDEN_GATE.model_copy(update={"shadow": True}),
            Decision("rejected", "shadow",
                     ["new-holdout accuracy 0.7500 >= champion's 0.2500 + 0.1",
                      "old-holdout accuracy 1.0000 >= champion's 0.7500 − 0.25",
                      "shadow mode: passed every rule, recorded but not promoted"],
                     {"candidate_old_accuracy": 1.0, "candidate_new_accuracy": 0.75, "n_old": 4, "n_new": 4,
                      "champion_old_accuracy": 0.75, "champion_new_accuracy": 0.25},
                     shadow=True),
            id="shadow",
        ),
    ],
)  # fmt: skip
def test_golden_decisions(candidate: Scores, champion: Scores | None, gate: GateSettings, expected: Decision) -> None:
    assert decide(candidate, champion, gate) == expected


def test_scores_are_flat_boolean_arrays() -> None:
    s = Scores([1, 0, 2], [[1], [0]])  # type: ignore[arg-type]
    assert s.old_correct.dtype == bool and s.old_correct.tolist() == [True, False, True]
    assert s.new_correct.dtype == bool and s.new_correct.tolist() == [True, False]
    assert (s.old_accuracy, s.new_accuracy) == (2 / 3, 0.5)
    assert Scores([], []).old_accuracy is None and Scores([], []).new_accuracy is None


def test_mcnemar_small_counts() -> None:
    assert mcnemar_exact(1, 0) == 0.5 and mcnemar_exact(0, 1) == 1.0 and mcnemar_exact(2, 0) == 0.25
    assert mcnemar_exact(0, 5) == 1.0
    with pytest.raises(ValueError, match="b=0, c=-1"):
        mcnemar_exact(0, -1)
