"""Maximum mean discrepancy two-sample test with a Gaussian kernel and a permutation p-value.

The pooled sample's kernel is computed once; every permutation is then a 0/1
indicator column ``a`` (which rows play "reference"), and all the sums the
unbiased MMD² needs (``aᵀKa``, ``aᵀK1``, ``aᵀdiag K``) come out of one matrix
product ``K @ A`` over a batch of permutations. Above ``exact_max_n`` pooled
samples the kernel is replaced by random Fourier features ``Φ`` (``K ≈ ΦΦᵀ``),
so memory stays linear in the sample size and ``K @ A`` becomes ``Aᵀ Φ``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from continual.drift.result import DriftResult, check_alpha, check_min_effect, check_windows, decide, resolve_device

# Budget for one batch of permutation indicators (N x B float32), so 40,000 pooled
# samples still run a few hundred permutations per matrix product.
_BATCH_ELEMENTS = 1 << 24


class MMDDetector:
    """Kernel two-sample test on embeddings (rows are samples).

    ``statistic`` is the *unbiased* MMD² estimate; ``effect`` is
    ``sqrt(max(MMD²_u, 0))``, a consistent estimate of the population MMD (kernel
    values lie in [0, 1]). The biased estimate would carry an O(1/n) upward bias,
    making small windows look more different than large ones. With standardised
    features and the median-heuristic bandwidth, in high dimensions the effect reads
    roughly as 0.55 x the RMS per-feature mean shift in standard deviations.

    ``exact_max_n`` caps the *pooled* size n + m for the exact kernel (10,000 pooled
    = a 400 MB float32 kernel); above it random Fourier features are used. Work runs
    in float32 on ``device`` ("auto": a CUDA input's device, else CUDA if present).

    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(300, 16))
    >>> MMDDetector(permutations=200, seed=0).check(ref, rng.normal(size=(300, 16))).detected
    False
    >>> MMDDetector(permutations=200, seed=0).check(ref, rng.normal(0.5, 1.0, size=(300, 16))).detected
    True
    """

    name = "mmd"

    def __init__(
        self,
        alpha: float = 0.05,
        # 0.02 ~ an RMS mean shift of 0.036 sd per feature (e.g. 0.2 sd in 3% of the
        # dimensions): below that, retraining would chase noise rather than new data.
        min_effect: float = 0.02,
        permutations: int = 500,
        exact_max_n: int = 10_000,
        rff_features: int = 2048,
        bandwidth: float | None = None,
        bandwidth_sample: int = 1000,
        standardize: bool = True,
        seed: int = 0,
        device: str | torch.device = "auto",
    ) -> None:
        check_alpha(alpha)
        check_min_effect(min_effect)
        if permutations < 1:
            raise ValueError(f"permutations must be >= 1, got {permutations!r}")
        if exact_max_n < 4:
            raise ValueError(f"exact_max_n must be >= 4, got {exact_max_n!r}")
        if rff_features < 2 or rff_features % 2:
            raise ValueError(f"rff_features must be an even number >= 2, got {rff_features!r}")
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be None or a positive number, got {bandwidth!r}")
        if bandwidth_sample < 2:
            raise ValueError(f"bandwidth_sample must be >= 2, got {bandwidth_sample!r}")
        self.alpha = alpha
        self.min_effect = min_effect
        self.permutations = permutations
        self.exact_max_n = exact_max_n
        self.rff_features = rff_features
        self.bandwidth = bandwidth
        self.bandwidth_sample = bandwidth_sample
        self.standardize = standardize
        self.seed = seed
        self.device = device

    def check(self, reference: npt.ArrayLike, current: npt.ArrayLike) -> DriftResult:
        ref, cur = check_windows(reference, current)
        n, m = ref.shape[0], cur.shape[0]
        size = n + m
        device = resolve_device(self.device, ref, cur)
        rng = np.random.default_rng(self.seed)
        z = torch.cat([_float32(w, device) for w in (ref, cur)])
        if self.standardize:
            # Pooled statistics are a symmetric function of the pooled sample, so the
            # permutation test stays exact (reference-only statistics would not be).
            mean = z.mean(0)
            std = z.std(0).nan_to_num_(0.0)
            z = (z - mean) / torch.where(std > 0, std, torch.ones_like(std))
        exact = size <= self.exact_max_n
        sub = torch.as_tensor(rng.choice(size, size=min(self.bandwidth_sample, size), replace=False), device=device)
        if exact:
            # One distance matrix serves both the bandwidth and the kernel.
            dist = _sq_dists(z, z)
            h = self.bandwidth or _median_distance(dist[sub][:, sub])
            sums: _KernelSums | _FeatureSums = _KernelSums(dist, h)
        else:
            sub_z = z[sub]
            h = self.bandwidth or _median_distance(_sq_dists(sub_z, sub_z))
            sums = _FeatureSums(z, h, self.rff_features, rng)
        del z

        # Split 0 is the observed one; the rest are uniform random relabellings, drawn a
        # batch at a time (in the same order for any batch size, so results are reproducible).
        batch = max(1, _BATCH_ELEMENTS // size)
        unbiased, biased_observed = [], 0.0
        for start in range(0, self.permutations + 1, batch):
            count = min(batch, self.permutations + 1 - start)
            splits = [np.arange(n) if start + j == 0 else rng.permutation(size)[:n] for j in range(count)]
            idx = torch.as_tensor(np.stack(splits, axis=1), device=device)
            a = torch.zeros(size, count, device=device).scatter_(0, idx, 1.0)
            # aᵀK1 and aᵀdiag(K) are plain gathers over the chosen rows, exact in float64.
            u, b = _mmd2(sums.quadratic(a), sums.rows[idx].sum(0), sums.diag[idx].sum(0), sums, n, m)
            unbiased.append(u.cpu())
            biased_observed = float(b[0]) if start == 0 else biased_observed
        stats = torch.cat(unbiased).numpy()
        observed = float(stats[0])
        p_value = float((1 + np.count_nonzero(stats[1:] >= observed)) / (1 + self.permutations))
        effect = math.sqrt(max(observed, 0.0))
        return DriftResult(
            detector=self.name,
            statistic=observed,
            p_value=p_value,
            effect=effect,
            detected=decide(p_value, effect, self.alpha, self.min_effect),
            n_reference=n,
            n_current=m,
            details={
                "method": "exact" if exact else "rff",
                "mmd2_biased": biased_observed,
                "bandwidth": float(h),
                "permutations": self.permutations,
                "rff_features": None if exact else self.rff_features,
                "standardized": self.standardize,
                "device": str(device),
                "alpha": self.alpha,
                "min_effect": self.min_effect,
            },
        )


def _float32(w: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    # Cast before moving: a float64 copy of a 20,000 x 1280 window would double the peak.
    if isinstance(w, torch.Tensor):
        return w.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device)


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = torch.mm(x, y.T).mul_(-2.0)
    d.add_((x * x).sum(1)[:, None]).add_((y * y).sum(1)[None, :])
    return d.clamp_(min=0.0)


def _median_distance(sq_dists: torch.Tensor) -> float:
    # The subsample ignores the labels, so a bandwidth taken from it keeps the test exact.
    k = sq_dists.shape[0]
    # Every off-diagonal entry (each pair twice, which leaves the median unchanged): dropping
    # the first element and viewing the rest as (k-1) x (k+1) puts the diagonal in the last column.
    pairs = sq_dists.flatten()[1:].view(k - 1, k + 1)[:, :-1]
    med = float(pairs.median().sqrt()) if pairs.numel() else 0.0
    # Mostly-identical points give a zero median; fall back so the kernel is not a delta.
    if med <= 0.0:
        med = float(pairs.max().sqrt()) if pairs.numel() and float(pairs.max()) > 0 else 1.0
    return med


class _KernelSums:
    """Exact kernel, O(N²) memory. Centred by its mean: MMD² is unchanged by a constant
    shift of the kernel, and entries near zero keep float32 sums accurate. (Reductions
    stay in float32: torch's dtype-converting reductions are many times slower, and the
    rounding left is orders of magnitude below the permutation spread of MMD².)"""

    def __init__(self, sq_dists: torch.Tensor, h: float) -> None:
        k = sq_dists.mul_(-0.5 / h**2).exp_()  # in place: the distances are not needed again
        k.fill_diagonal_(1.0)
        rows = k.sum(1).double()
        shift = float(rows.sum()) / k.shape[0] ** 2
        k -= shift
        self.k = k
        self.diag = k.diagonal().double()
        self.rows = rows - shift * k.shape[0]
        self.total = float(self.rows.sum())
        self.trace = float(self.diag.sum())

    def quadratic(self, a: torch.Tensor) -> torch.Tensor:
        return (a * (self.k @ a)).sum(0).double()


class _FeatureSums:
    """Random Fourier features (Rahimi & Recht): cos/sin pairs of Gaussian frequencies
    give an unbiased kernel estimate with exactly unit diagonal; O(N·D) memory."""

    def __init__(self, z: torch.Tensor, h: float, features: int, rng: np.random.Generator) -> None:
        half = features // 2
        w = torch.as_tensor(rng.standard_normal((z.shape[1], half)) / h, dtype=torch.float32, device=z.device)
        phi = torch.empty(z.shape[0], features, device=z.device)
        for start in range(0, z.shape[0], 4096):  # chunks bound the projection's temporaries
            proj = z[start : start + 4096] @ w
            phi[start : start + 4096, :half] = proj.cos()
            phi[start : start + 4096, half:] = proj.sin()
        phi *= 1.0 / math.sqrt(half)
        phi -= phi.mean(0)  # same centring argument as the exact kernel
        self.phi = phi
        self.diag = torch.linalg.vector_norm(phi, dim=1).double().square()
        self.colsum = phi.sum(0).double()
        self.rows = (phi @ self.colsum.float()).double()
        self.total = float(self.colsum @ self.colsum)
        self.trace = float(self.diag.sum())

    def quadratic(self, a: torch.Tensor) -> torch.Tensor:
        s = a.T @ self.phi
        return (s * s).sum(1).double()


def _mmd2(
    aka: torch.Tensor, ar: torch.Tensor, ad: torch.Tensor, sums: _KernelSums | _FeatureSums, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased and biased MMD² from aᵀKa, aᵀK1 and aᵀdiag(K), with b = 1 - a."""
    kxy = ar - aka
    kyy = sums.total - 2.0 * ar + aka
    unbiased = (aka - ad) / (n * (n - 1)) + (kyy - (sums.trace - ad)) / (m * (m - 1)) - 2.0 * kxy / (n * m)
    biased = aka / n**2 + kyy / m**2 - 2.0 * kxy / (n * m)
    return unbiased, biased
