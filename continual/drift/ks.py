"""Per-feature two-sample Kolmogorov–Smirnov tests with a Benjamini–Hochberg correction.

All features are tested at once: each feature's pooled column is sorted once,
and the signed running count (+m for a reference value, -n for a current one)
gives ``n·m·(F_ref - F_cur)`` exactly in integers; D is its largest magnitude at
the end of a run of tied values. p-values use Smirnov's asymptotic distribution
(``scipy.stats.kstwo`` at ``n·m/(n+m)``), as ``scipy.stats.ks_2samp(method="asymp")`` does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import stats

from continual.drift.result import DriftResult, check_alpha, check_min_effect, check_windows, decide

_PROJECTIONS = ("random", "pca")
# Sorting N x chunk values at a time bounds memory for 40,000 x 1280 windows.
_CHUNK_ELEMENTS = 1 << 23


class KSDetector:
    """Per-feature KS tests; ``p_value`` is the smallest BH-adjusted p-value.

    ``effect`` is the largest KS distance D over all features. Because every
    feature has the same window sizes, a smaller p-value means a larger D, so
    whenever anything is significant this is also the largest D among the
    BH-significant features. ``max_features`` projects wider inputs first: a
    seeded random orthonormal projection, or PCA fitted on the *pooled* windows
    (a reference-only PCA overfits the reference and inflates its variance along
    the chosen axes, which the test would read as drift).

    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(500, 8))
    >>> KSDetector().check(ref, rng.normal(size=(500, 8))).detected
    False
    >>> KSDetector().check(ref, rng.normal(0.5, 1.0, size=(500, 8))).detected
    True
    """

    name = "ks"

    def __init__(
        self,
        alpha: float = 0.05,
        # D = 0.1: some feature's CDF moved by 10 percentage points, about a quarter
        # sd mean shift of a normal feature; smaller moves are visible only at huge n.
        min_effect: float = 0.1,
        max_features: int | None = None,
        projection: str = "random",
        seed: int = 0,
    ) -> None:
        check_alpha(alpha)
        check_min_effect(min_effect)
        if max_features is not None and max_features < 1:
            raise ValueError(f"max_features must be None or >= 1, got {max_features!r}")
        if projection not in _PROJECTIONS:
            raise ValueError(f"projection must be one of {_PROJECTIONS}, got {projection!r}")
        self.alpha = alpha
        self.min_effect = min_effect
        self.max_features = max_features
        self.projection = projection
        self.seed = seed

    def check(self, reference: npt.ArrayLike, current: npt.ArrayLike) -> DriftResult:
        ref, cur = check_windows(reference, current, min_samples=1)
        ref, cur = _numpy(ref), _numpy(cur)
        n, m = ref.shape[0], cur.shape[0]
        k = self.max_features
        projected = k is not None and ref.shape[1] > k
        if k is not None and projected:
            basis = self._basis(ref, cur, k)
            ref, cur = ref @ basis, cur @ basis
        d = ks_statistics(ref, cur)
        # D lives on a lattice of multiples of 1/lcm(n, m), so features share few distinct
        # values; scipy's kstwo evaluates each in a Python loop, hence the unique.
        distinct, where = np.unique(d, return_inverse=True)
        p = stats.kstwo.sf(distinct, round(n * m / (n + m)))[where]
        adjusted = benjamini_hochberg(p)
        p_value = float(adjusted.min())
        effect = float(d.max())
        worst = int(d.argmax())
        return DriftResult(
            detector=self.name,
            statistic=effect,
            p_value=p_value,
            effect=effect,
            detected=decide(p_value, effect, self.alpha, self.min_effect),
            n_reference=n,
            n_current=m,
            details={
                "features": int(d.size),
                "significant_features": int(np.count_nonzero(adjusted < self.alpha)),
                "worst_feature": worst,
                "projection": self.projection if projected else None,
                "alpha": self.alpha,
                "min_effect": self.min_effect,
            },
        )

    def _basis(self, ref: np.ndarray, cur: np.ndarray, k: int) -> np.ndarray:
        if self.projection == "random":
            # Data-independent, so it cannot bias the test; QR makes the axes orthonormal.
            rng = np.random.default_rng(self.seed)
            q, _ = np.linalg.qr(rng.standard_normal((ref.shape[1], k)))
            return q
        pooled = np.concatenate([ref, cur])
        pooled -= pooled.mean(0)
        # Eigenvectors of the d x d covariance: far cheaper than an SVD of the N x d data.
        _, vectors = np.linalg.eigh(pooled.T @ pooled)
        return vectors[:, ::-1][:, :k]


def ks_statistics(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KS distance D for every column of ``x`` (n x d) against the same column of ``y`` (m x d)."""
    n, m = x.shape[0], y.shape[0]
    size = n + m
    # |walk| <= n*m, so int32 suffices unless both windows are huge; it halves the memory traffic.
    step_dtype = np.int32 if n * m < 2**31 else np.int64
    steps = np.where(np.arange(size) < n, m, -n).astype(step_dtype)
    out = np.empty(x.shape[1])
    chunk = max(1, _CHUNK_ELEMENTS // size)
    for start in range(0, x.shape[1], chunk):
        cols = slice(start, start + chunk)
        # One row per feature: sorting along contiguous rows is ~3x faster than down columns.
        z = np.concatenate([x[:, cols], y[:, cols]]).T.copy()
        # Tie order does not matter (only run ends are read), so the fast unstable sort is fine.
        order = np.argsort(z, axis=1)
        walk = np.cumsum(steps[order], axis=1, dtype=step_dtype)
        z_sorted = np.take_along_axis(z, order, axis=1)
        # Inside a run of ties the walk is mid-step; only its value after the last tie counts.
        run_end = np.ones(walk.shape, dtype=bool)
        run_end[:, :-1] = z_sorted[:, 1:] != z_sorted[:, :-1]
        out[cols] = np.abs(walk, where=run_end, out=np.zeros_like(walk)).max(axis=1) / (n * m)
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (step-up), in the input order."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def _numpy(w: npt.ArrayLike) -> np.ndarray:
    if hasattr(w, "detach"):
        w = w.detach().cpu().numpy()
    return np.asarray(w, dtype=np.float64)
