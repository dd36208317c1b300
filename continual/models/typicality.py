"""How far an input lies from the data a model was checked on: a distance in its embedding space.

Fitted on the holdout's penultimate-layer embeddings when a candidate is built
(``continual.learn.calibrate``): embeddings are projected onto their first ``dims``
principal axes, whitened by a Ledoit-Wolf shrunk within-class covariance, and an
input's distance is the Mahalanobis distance to the nearest class mean. The
threshold is the 99th percentile of *out-of-fold* holdout distances (each fold scored
by a fit on the others), so about 1% of new in-distribution inputs exceed it. Serving
scores every prediction (:meth:`Typicality.ratio`: distance / threshold, > 1 is far);
the label-free accuracy estimates count far predictions at chance
(``continual.drift.estimate``): a model's confidence says nothing about inputs unlike
anything it was checked on (inverted or transposed digits get confident wrong answers).

>>> rng = np.random.default_rng(0)
>>> emb = rng.normal(size=(400, 8)); labels = rng.integers(0, 2, 400); emb[labels == 1] += 3.0
>>> t = Typicality.fit(emb, labels, dims=8)
>>> float(np.mean(t.ratio(rng.normal(size=(1000, 8))) > 1)) < 0.05, float(np.mean(t.ratio(emb + 8.0) > 1))
(True, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QUANTILE = 0.99
DIMS = 64  # principal axes kept: a covariance of 1280-d embeddings from a few hundred samples is noise
FOLDS = 5


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf shrunk covariance of the rows of ``x`` (centred here), as scikit-learn computes it."""
    x = x - x.mean(axis=0)
    n, p = x.shape
    emp = x.T @ x / n
    mu = float(np.trace(emp)) / p
    x2 = x**2
    beta_ = float(np.sum(x2.T @ x2)) / n
    delta_ = float(np.sum(emp**2))
    beta = (beta_ / n - delta_ / n) / p
    delta = (delta_ - 2 * mu * float(np.trace(emp)) + p * mu**2) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if delta == 0 else beta / delta
    return (1 - shrinkage) * emp + shrinkage * mu * np.eye(p)


@dataclass(frozen=True)
class Typicality:
    center: np.ndarray  # [D] embedding mean
    components: np.ndarray  # [r, D] principal axes
    whitener: np.ndarray  # [r, r]: ||whitener @ y||^2 is the Mahalanobis distance of y
    class_means: np.ndarray  # [K, r] whitened class means
    threshold: float  # the out-of-fold QUANTILE of holdout distances

    @classmethod
    def fit(
        cls, emb: np.ndarray, labels: np.ndarray, *, dims: int = DIMS, quantile: float = QUANTILE, folds: int = FOLDS
    ) -> Typicality:
        """Fit on embeddings ``[n, D]`` and class labels ``[n]`` (n >= 2 * folds)."""
        emb, labels = np.asarray(emb, np.float64), np.asarray(labels)
        if emb.ndim != 2 or len(emb) != len(labels):
            raise ValueError(f"emb must be [n, D] and labels [n], got {emb.shape} and {labels.shape}")
        if len(emb) < 2 * folds:
            raise ValueError(f"need at least {2 * folds} samples, got {len(emb)}")
        order = np.random.default_rng(0).permutation(len(emb))
        oof = np.empty(len(emb))
        for fold in np.array_split(order, folds):
            rest = np.setdiff1d(order, fold)
            oof[fold] = cls._fit(emb[rest], labels[rest], dims, 1.0).distance(emb[fold])
        return cls._fit(emb, labels, dims, float(np.quantile(oof, quantile)))

    @classmethod
    def _fit(cls, emb: np.ndarray, labels: np.ndarray, dims: int, threshold: float) -> Typicality:
        center = emb.mean(axis=0)
        r = max(1, min(dims, emb.shape[1], len(emb) - 1))
        _, _, vt = np.linalg.svd(emb - center, full_matrices=False)
        components = vt[:r]
        y = (emb - center) @ components.T
        classes = np.unique(labels)
        means = np.stack([y[labels == c].mean(axis=0) for c in classes])
        resid = y - means[np.searchsorted(classes, labels)]
        cov = ledoit_wolf(resid) + 1e-9 * np.eye(r)
        # cov^-1 = L L^T with L = cholesky(cov^-1): ||L^T y||^2 = y^T cov^-1 y.
        whitener = np.linalg.cholesky(np.linalg.inv(cov)).T
        return cls(center, components, whitener, means @ whitener.T, threshold)

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each embedding to the nearest class mean."""
        w = ((np.asarray(emb, np.float64) - self.center) @ self.components.T) @ self.whitener.T
        d2 = (w**2).sum(axis=1)[:, None] - 2 * w @ self.class_means.T + (self.class_means**2).sum(axis=1)[None, :]
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))

    def ratio(self, emb: np.ndarray) -> np.ndarray:
        """Distance / threshold: above 1, farther than all but 1% of the holdout."""
        return self.distance(emb) / self.threshold

    # -- as stored beside a version's weights ("typicality.safetensors") --------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "center": torch.from_numpy(self.center.astype(np.float32)),
            "components": torch.from_numpy(self.components.astype(np.float32)),
            "whitener": torch.from_numpy(self.whitener.astype(np.float32)),
            "class_means": torch.from_numpy(self.class_means.astype(np.float32)),
            "threshold": torch.tensor([self.threshold], dtype=torch.float32),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Typicality:
        def a(name: str) -> np.ndarray:
            return t[name].detach().cpu().numpy().astype(np.float64)

        return cls(a("center"), a("components"), a("whitener"), a("class_means"), float(a("threshold")[0]))
