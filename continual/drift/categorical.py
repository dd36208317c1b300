"""Shift in class distributions: labels of feedback, and the champion's predictions.

Both use a chi-square test of homogeneity on the 2 x classes count table, with
Cramér's V as the effect (for two rows V = sqrt(chi² / N): 0 for identical
distributions, 1 for disjoint ones, and not growing with the sample size).
Prediction shift adds a KS test on the confidences, so traffic that the model
suddenly finds harder shows up before any labels arrive.

The chi² p-value is asymptotic and unreliable once an expected count falls below
5 (small windows, rare classes). Then the p-value comes from an exact-margins
permutation test instead: the reference window's counts are redrawn from a
multivariate hypergeometric (the same as shuffling which window each sample fell
in), vectorised, so 9,999 resamples cost milliseconds at any window size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from continual.drift.result import DriftResult, check_alpha, check_min_effect, decide

# 0.1 is the conventional "small" Cramér's V (Cohen): smaller differences in class
# mix rarely change a classifier's accuracy enough to be worth retraining for.
DEFAULT_MIN_EFFECT = 0.1
# Below this expected count in any cell the asymptotic chi² p-value is not trusted (Cochran's rule).
MIN_EXPECTED_COUNT = 5.0
PERMUTATIONS = 9_999


class LabelShiftDetector:
    """Chi-square test on label counts, old vs new feedback; effect = Cramér's V.

    Classes absent from both windows are dropped (they carry no information and
    would make expected counts zero).

    >>> rng = np.random.default_rng(0)
    >>> ref = rng.choice(3, size=1000, p=[0.5, 0.3, 0.2])
    >>> LabelShiftDetector().check(ref, rng.choice(3, size=1000, p=[0.5, 0.3, 0.2])).detected
    False
    >>> LabelShiftDetector().check(ref, rng.choice(3, size=1000, p=[0.2, 0.3, 0.5])).detected
    True
    """

    name = "label_shift"

    def __init__(self, alpha: float = 0.05, min_effect: float = DEFAULT_MIN_EFFECT, num_classes: int | None = None):
        check_alpha(alpha)
        check_min_effect(min_effect)
        _check_num_classes(num_classes)
        self.alpha = alpha
        self.min_effect = min_effect
        self.num_classes = num_classes

    def check(self, reference: npt.ArrayLike, current: npt.ArrayLike) -> DriftResult:
        ref = _classes("reference", reference, self.num_classes)
        cur = _classes("current", current, self.num_classes)
        chi2, p_value, v, details = chi_square_shift(ref, cur, self.num_classes)
        return DriftResult(
            detector=self.name,
            statistic=chi2,
            p_value=p_value,
            effect=v,
            detected=decide(p_value, v, self.alpha, self.min_effect),
            n_reference=ref.size,
            n_current=cur.size,
            details={**details, "alpha": self.alpha, "min_effect": self.min_effect},
        )


class PredictionShiftDetector:
    """Predicted-class chi-square plus a KS test on confidences, Bonferroni-combined.

    ``p_value = min(1, k · min(p_i))`` over the k component tests, so ``statistic``
    is that smallest component p-value. ``effect`` is the largest effect (Cramér's
    V, KS D) among components significant at ``alpha / k``, or among all when none
    is: a large but insignificant effect in one test cannot lend weight to a
    significant but negligible one in the other.

    >>> rng = np.random.default_rng(0)
    >>> ref, ref_conf = rng.choice(4, size=2000), rng.beta(8, 2, size=2000)
    >>> cur, cur_conf = rng.choice(4, size=2000), rng.beta(4, 2, size=2000)
    >>> PredictionShiftDetector().check(ref, cur, ref_conf, cur_conf).detected
    True
    """

    name = "prediction_shift"

    def __init__(self, alpha: float = 0.05, min_effect: float = DEFAULT_MIN_EFFECT, num_classes: int | None = None):
        check_alpha(alpha)
        check_min_effect(min_effect)
        _check_num_classes(num_classes)
        self.alpha = alpha
        self.min_effect = min_effect
        self.num_classes = num_classes

    def check(
        self,
        reference: npt.ArrayLike,
        current: npt.ArrayLike,
        reference_confidence: npt.ArrayLike | None = None,
        current_confidence: npt.ArrayLike | None = None,
    ) -> DriftResult:
        ref = _classes("reference", reference, self.num_classes)
        cur = _classes("current", current, self.num_classes)
        chi2, p_classes, v, details = chi_square_shift(ref, cur, self.num_classes)
        tests = {"classes": (p_classes, v)}
        if (reference_confidence is None) != (current_confidence is None):
            raise ValueError("reference_confidence and current_confidence must be given together")
        if reference_confidence is not None:
            ref_conf = _confidences("reference_confidence", reference_confidence, ref.size)
            cur_conf = _confidences("current_confidence", current_confidence, cur.size)
            ks = stats.ks_2samp(ref_conf, cur_conf)
            tests["confidence"] = (float(ks.pvalue), float(ks.statistic))
            details["confidence_ks_d"] = float(ks.statistic)
            details["confidence_p_value"] = float(ks.pvalue)
        k = len(tests)
        smallest = min(p for p, _ in tests.values())
        p_value = min(1.0, k * smallest)
        significant = [e for p, e in tests.values() if p < self.alpha / k] or [e for _, e in tests.values()]
        effect = max(significant)
        details.update(classes_chi2=chi2, classes_p_value=p_classes, alpha=self.alpha, min_effect=self.min_effect)
        return DriftResult(
            detector=self.name,
            statistic=smallest,
            p_value=p_value,
            effect=effect,
            detected=decide(p_value, effect, self.alpha, self.min_effect),
            n_reference=ref.size,
            n_current=cur.size,
            details=details,
        )


def chi_square_shift(
    ref: np.ndarray, cur: np.ndarray, num_classes: int | None = None
) -> tuple[float, float, float, dict[str, Any]]:
    """(chi², p-value, Cramér's V, details) for two arrays of class indices.

    ``details["p_value_method"]`` says where the p-value came from: ``"asymptotic"``
    (chi² distribution) or ``"permutation"`` (some expected count < 5; a fixed seed, so the
    same windows always give the same answer).
    """
    width = num_classes or int(max(ref.max(initial=-1), cur.max(initial=-1))) + 1
    table = np.stack([np.bincount(ref, minlength=width), np.bincount(cur, minlength=width)])
    observed = table[:, table.sum(0) > 0]
    shares = table / table.sum(1, keepdims=True)
    details: dict[str, Any] = {
        "classes_seen": int(observed.shape[1]),
        "total_variation": float(0.5 * np.abs(shares[0] - shares[1]).sum()),
    }
    if observed.shape[1] < 2:
        # One class in both windows: the distributions are identical by construction.
        return 0.0, 1.0, 0.0, details
    # No Yates correction: it over-corrects, and the effect gate already guards against
    # acting on tiny differences.
    chi2, p_value, _, expected = stats.chi2_contingency(observed, correction=False)
    details["min_expected_count"] = float(expected.min())
    details["p_value_method"] = "asymptotic"
    if expected.min() < MIN_EXPECTED_COUNT:
        p_value = permutation_p_value(observed, float(chi2), np.random.default_rng(0))
        details["p_value_method"] = "permutation"
        details["permutations"] = PERMUTATIONS
    return float(chi2), float(p_value), math.sqrt(chi2 / observed.sum()), details


def permutation_p_value(
    observed: np.ndarray, chi2: float, rng: np.random.Generator, n_resamples: int = PERMUTATIONS
) -> float:
    """P(chi² >= observed) over tables with the observed margins: ``(1 + #{perm >= obs}) / (1 + n)``.

    Redrawing the first row from a multivariate hypergeometric over the column totals
    is exactly what shuffling the row labels of the pooled samples does.
    """
    cols = observed.sum(0)
    n_ref = int(observed[0].sum())
    total = int(cols.sum())
    expected = np.stack([cols * n_ref / total, cols * (total - n_ref) / total])
    row0 = rng.multivariate_hypergeometric(cols.astype(np.int64), n_ref, size=n_resamples)
    sims = ((row0 - expected[0]) ** 2 / expected[0]).sum(1) + ((cols - row0 - expected[1]) ** 2 / expected[1]).sum(1)
    # Ties in chi² (common with small counts) count as "at least as extreme"; the
    # relative tolerance keeps float rounding from splitting a tie.
    extreme = int(np.count_nonzero(sims >= chi2 * (1 - 1e-9)))
    return (1 + extreme) / (1 + n_resamples)


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None or >= 1, got {num_classes!r}")


def _classes(name: str, values: npt.ArrayLike, num_classes: int | None) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    a = np.asarray(values)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of class indices, got shape {a.shape}")
    whole_floats = np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a))
    if not (np.issubdtype(a.dtype, np.integer) or whole_floats):
        raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.min() < 0 or (num_classes is not None and a.max() >= num_classes):
        raise ValueError(f"{name} class indices must be in [0, {num_classes or 'inf'}), got {a.min()}..{a.max()}")
    return a


def _confidences(name: str, values: npt.ArrayLike, size: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (size,) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be {size} finite numbers (one per prediction), got shape {a.shape}")
    return a
