from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from continual.drift import LabelShiftDetector, PredictionShiftDetector

PRIOR = [0.4, 0.3, 0.2, 0.1]


def _golden_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {
        "ref": rng.choice(4, size=800, p=PRIOR),
        "same": rng.choice(4, size=600, p=PRIOR),
        "shifted": rng.choice(4, size=600, p=[0.25] * 4),
        "ref_conf": rng.beta(8, 2, size=800),
        "same_conf": rng.beta(8, 2, size=600),
        "harder_conf": rng.beta(5, 2, size=600),
    }


def test_label_shift_golden() -> None:
    d = _golden_data()
    quiet = LabelShiftDetector().check(d["ref"], d["same"])
    assert not quiet.detected
    assert quiet.statistic == pytest.approx(0.7093961870822889, rel=1e-9)
    assert quiet.p_value == pytest.approx(0.8709916772601539, rel=1e-9)
    loud = LabelShiftDetector().check(d["ref"], d["shifted"])
    assert loud.detected
    assert loud.statistic == pytest.approx(91.75326441940727, rel=1e-9)
    assert loud.effect == pytest.approx(0.256003996089636, rel=1e-9)
    assert (loud.n_reference, loud.n_current) == (800, 600)


def test_label_shift_matches_scipy_and_cramers_v() -> None:
    d = _golden_data()
    table = np.stack([np.bincount(d["ref"], minlength=4), np.bincount(d["shifted"], minlength=4)])
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    r = LabelShiftDetector().check(d["ref"], d["shifted"])
    assert (r.statistic, r.p_value) == pytest.approx((chi2, p), rel=1e-12)
    assert r.effect == pytest.approx(math.sqrt(chi2 / table.sum()))


def test_classes_missing_from_both_windows_are_dropped() -> None:
    d = _golden_data()
    wide = LabelShiftDetector(num_classes=7).check(d["ref"], d["shifted"])
    narrow = LabelShiftDetector().check(d["ref"], d["shifted"])
    assert (wide.statistic, wide.p_value, wide.effect) == (narrow.statistic, narrow.p_value, narrow.effect)
    assert wide.details["classes_seen"] == 4


def test_single_class_and_disjoint_classes() -> None:
    one = LabelShiftDetector().check(np.zeros(50, dtype=int), np.zeros(30, dtype=int))
    assert (one.p_value, one.effect, one.detected) == (1.0, 0.0, False)
    disjoint = LabelShiftDetector().check(np.zeros(50, dtype=int), np.ones(30, dtype=int))
    assert disjoint.detected and disjoint.effect == pytest.approx(1.0)
    assert disjoint.details["total_variation"] == 1.0


def test_class_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="reference class indices"):
        LabelShiftDetector().check(np.array([0, -1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="current class indices"):
        LabelShiftDetector(num_classes=2).check(np.array([0, 1]), np.array([0, 2]))
    with pytest.raises(ValueError, match="current must hold integer"):
        LabelShiftDetector().check(np.array([0, 1]), np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="reference must be a non-empty 1-D"):
        LabelShiftDetector().check(np.array([], dtype=int), np.array([0]))
    with pytest.raises(ValueError, match="num_classes"):
        LabelShiftDetector(num_classes=0)
    with pytest.raises(ValueError, match="alpha"):
        PredictionShiftDetector(alpha=0)
    r = LabelShiftDetector().check(torch.tensor([0, 1, 1]), np.array([1.0, 0.0, 1.0]))
    assert r.n_reference == 3


def test_prediction_shift_golden() -> None:
    d = _golden_data()
    detector = PredictionShiftDetector()
    quiet = detector.check(d["ref"], d["same"], d["ref_conf"], d["same_conf"])
    assert not quiet.detected
    assert quiet.p_value == pytest.approx(0.9113872622710417, rel=1e-9)
    harder = detector.check(d["ref"], d["same"], d["ref_conf"], d["harder_conf"])
    assert harder.detected and harder.effect == pytest.approx(0.2579166666666667)
    assert harder.p_value == pytest.approx(2 * harder.details["confidence_p_value"])
    relabelled = detector.check(d["ref"], d["shifted"], d["ref_conf"], d["same_conf"])
    assert relabelled.detected and relabelled.effect == pytest.approx(0.256003996089636, rel=1e-9)


def test_prediction_shift_without_confidences_is_the_class_test() -> None:
    d = _golden_data()
    pred = PredictionShiftDetector().check(d["ref"], d["shifted"])
    label = LabelShiftDetector().check(d["ref"], d["shifted"])
    assert (pred.p_value, pred.effect) == (label.p_value, label.effect)
    with pytest.raises(ValueError, match="together"):
        PredictionShiftDetector().check(d["ref"], d["shifted"], d["ref_conf"])
    with pytest.raises(ValueError, match="current_confidence must be 600"):
        PredictionShiftDetector().check(d["ref"], d["shifted"], d["ref_conf"], d["ref_conf"])


def test_effect_comes_from_significant_components_only() -> None:
    # Class mix: chi² p = 0.016 (significant at alpha/2), V = 0.0120. Confidences: every
    # value moved up by 0.013, KS D = 0.01305 but p = 0.066 (not significant at alpha/2).
    n = 20_000
    ref, cur = np.repeat([0, 1], [10_000, 10_000]), np.repeat([0, 1], [9_760, 10_240])
    ref_conf = (np.arange(n) + 0.5) / n
    cur_conf = np.clip(ref_conf + 0.013, 0.0, 1.0)
    r = PredictionShiftDetector(min_effect=0.0125).check(ref, cur, ref_conf, cur_conf)
    assert r.details["confidence_ks_d"] > 0.0125 > r.effect
    assert r.p_value == pytest.approx(2 * r.details["classes_p_value"]) and r.p_value < 0.05
    assert r.effect == pytest.approx(0.0120, abs=1e-4) and not r.detected
    assert PredictionShiftDetector(min_effect=0.0115).check(ref, cur, ref_conf, cur_conf).detected


def test_small_significant_class_shift_is_gated() -> None:
    rng = np.random.default_rng(0)
    ref = rng.choice(2, size=20_000, p=[0.5, 0.5])
    cur = rng.choice(2, size=20_000, p=[0.53, 0.47])
    conf = rng.uniform(size=20_000)
    r = PredictionShiftDetector().check(ref, cur, conf, conf.copy())
    assert r.details["confidence_ks_d"] == 0.0
    assert r.p_value < 0.05 and r.effect < 0.1 and not r.detected


def test_sparse_tables_get_a_permutation_p_value() -> None:
    ref = np.repeat([0, 1, 2, 3, 4], [40, 3, 2, 0, 5])
    cur = np.repeat([0, 1, 2, 3, 4], [20, 1, 0, 4, 30])
    r = LabelShiftDetector().check(ref, cur)
    assert r.details["p_value_method"] == "permutation" and r.details["min_expected_count"] < 5
    table = np.stack([np.bincount(ref, minlength=5), np.bincount(cur, minlength=5)])
    scipy_perm = stats.chi2_contingency(
        table, correction=False, method=stats.PermutationMethod(n_resamples=9999, rng=np.random.default_rng(7))
    )
    assert r.statistic == pytest.approx(scipy_perm.statistic, rel=1e-12)
    assert r.p_value == pytest.approx(scipy_perm.pvalue, abs=0.01)
    # Few samples, few distinct tables: compare with a tie-heavy case too.
    small = LabelShiftDetector().check(np.array([0] * 30 + [2]), np.array([0] * 25 + [1, 1]))
    table = np.array([[30, 0, 1], [25, 2, 0]])
    scipy_small = stats.chi2_contingency(
        table, correction=False, method=stats.PermutationMethod(n_resamples=9999, rng=np.random.default_rng(7))
    )
    assert small.p_value == pytest.approx(scipy_small.pvalue, abs=0.02)
    # Seeded: the same windows give the same answer.
    assert LabelShiftDetector().check(ref, cur).p_value == r.p_value
    # Plenty in every cell: the asymptotic p-value stays (and matches scipy exactly, above).
    d = _golden_data()
    assert LabelShiftDetector().check(d["ref"], d["shifted"]).details["p_value_method"] == "asymptotic"


def test_sparse_tables_keep_the_false_alarm_rate() -> None:
    """No shift, small windows, rare classes: p < alpha in at most about alpha of the trials."""
    rng = np.random.default_rng(3)
    prior = [0.85, 0.05, 0.05, 0.05]
    trials, alpha = 400, 0.05
    p_values = []
    for _ in range(trials):
        r = LabelShiftDetector(alpha=alpha, min_effect=0).check(rng.choice(4, 30, p=prior), rng.choice(4, 30, p=prior))
        assert r.details["p_value_method"] == "permutation"
        p_values.append(r.p_value)
    rate = np.mean(np.array(p_values) < alpha)
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials), rate
    # ... and it is a real test, not one that never fires: clearly different windows are flagged.
    shifted = LabelShiftDetector(alpha=alpha, min_effect=0).check(
        rng.choice(4, 30, p=prior), rng.choice(4, 30, p=[0.4, 0.2, 0.2, 0.2])
    )
    assert shifted.p_value < alpha and shifted.details["p_value_method"] == "permutation"


def test_prediction_shift_result_in_full() -> None:
    """Every field of one result, and the argument names in its errors (torch tensors accepted)."""
    ref = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    cur = np.array([0, 1, 1, 1, 2, 2, 2, 2])
    ref_conf, cur_conf = torch.linspace(0.5, 0.9, 8, dtype=torch.float32), np.linspace(0.4, 0.8, 8)
    r = PredictionShiftDetector(alpha=0.2, min_effect=0.3, num_classes=4).check(ref, cur, ref_conf, cur_conf)
    chi2, *_ = stats.chi2_contingency(np.array([[3, 3, 2], [1, 3, 4]]), correction=False)
    ks = stats.ks_2samp(ref_conf.numpy().astype(np.float64), cur_conf)
    assert (r.detector, r.n_reference, r.n_current) == ("prediction_shift", 8, 8)
    assert r.details["classes_chi2"] == pytest.approx(chi2)
    assert r.details["confidence_p_value"] == pytest.approx(ks.pvalue)
    assert r.details["confidence_ks_d"] == pytest.approx(ks.statistic)
    assert (r.details["alpha"], r.details["min_effect"]) == (0.2, 0.3)
    assert r.statistic == pytest.approx(min(ks.pvalue, r.details["classes_p_value"]))
    assert r.p_value == pytest.approx(min(1.0, 2 * r.statistic))
    # A permutation p-value for a sparse table; num_classes keeps the empty class in the table width.
    assert r.details["p_value_method"] == "permutation" and r.details["classes_seen"] == 3
    assert r.details["total_variation"] == pytest.approx(0.5 * (2 / 8 + 0 + 2 / 8 + 0))
    # Both components insignificant: p is capped at 1, never above.
    flat = PredictionShiftDetector().check([0, 1] * 20, [1, 0] * 20, [0.5] * 40, [0.5] * 40)
    assert flat.p_value == 1.0 and flat.effect == 0.0 and not flat.detected
    with pytest.raises(ValueError, match=r"current class indices must be in \[0, 4\)"):
        PredictionShiftDetector(num_classes=4).check([0, 1], [0, 4])
    with pytest.raises(ValueError, match="num_classes must be None or >= 1, got 0"):
        PredictionShiftDetector(num_classes=0)
    with pytest.raises(ValueError, match="reference must hold integer"):
        PredictionShiftDetector().check([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="current must be a non-empty 1-D"):
        PredictionShiftDetector().check([0, 1], [])
    with pytest.raises(ValueError, match=r"reference_confidence must be 2 finite numbers .* got shape \(3,\)"):
        PredictionShiftDetector().check([0, 1], [0, 1], [0.5, 0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="current_confidence must be 2 finite"):
        PredictionShiftDetector().check([0, 1], [0, 1], torch.tensor([0.5, 0.5]), [0.5, float("nan")])
