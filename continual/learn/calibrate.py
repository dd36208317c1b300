"""Temperature scaling: one scalar T fitted on the holdout by negative log-likelihood.

Served probabilities become ``softmax(logits / T)``. The predicted class never changes;
only how sure the model says it is. A network trained with cross-entropy is usually
overconfident on data like its training data (T > 1 brings its confidence down to its
accuracy), and label-free accuracy estimates (``continual.drift.estimate``) read those
confidences, so they need them calibrated.

The fit runs when a candidate is built, on the holdout up to its data cutoff (the
holdout the gate will score it on), and is written into the version's manifest
(``extra.calibration``): the manifest is checksummed and never rewritten, so the
temperature a version serves with is fixed before it can be promoted. The same pass
fits the version's :class:`~continual.models.typicality.Typicality` on the holdout's
embeddings (``typicality.safetensors`` beside the weights): how far an input is from
what the model was checked on.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from continual.config import Settings
from continual.learn.data import decode_row, load_transform
from continual.models import Classifier
from continual.models.typicality import Typicality
from continual.store import Store

log = logging.getLogger("continual.learn.calibrate")

# Below this many holdout samples a temperature is mostly noise: the version serves uncalibrated.
MIN_SAMPLES = 20
MAX_SAMPLES = 1_000  # the fit needs a few hundred; the forward pass over more only costs time
QUANTILES = 201  # holdout confidence quantiles kept for ATC (0.5% steps)
_BOUNDS = (0.05, 20.0)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``.

    >>> round(nll(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([0, 0])), 4)
    1.1269
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"logits must be [n, classes] and labels [n], got {z.shape} and {y.shape}")
    if not len(y):
        raise ValueError("no samples")
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises :func:`nll` (searched over log T; never worse than T = 1).

    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 500)
    >>> z = rng.normal(size=(500, 3)); z[np.arange(500), y] += 1.0
    >>> t = fit_temperature(z * 4, y)   # 4x overconfident logits
    >>> 3.0 < t < 5.0
    True
    """
    lo, hi = (math.log(b) for b in _BOUNDS)
    res = minimize_scalar(lambda u: nll(logits, labels, math.exp(u)), bounds=(lo, hi), method="bounded")
    t = float(math.exp(res.x))
    return t if nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


def confidence(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The top-class probability of each row under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(z.max(axis=1) - logsumexp(z, axis=1))


def calibration_of(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """What the manifest keeps: the temperature, the NLL before and after, and the holdout's calibrated confidences.

    Samples whose label the model does not know (``-1``) are left out.
    """
    keep = labels >= 0
    z, y = np.asarray(logits)[keep], np.asarray(labels)[keep]
    if len(y) < MIN_SAMPLES:
        return {"temperature": 1.0, "n": len(y), "skipped": f"{len(y)} holdout samples < {MIN_SAMPLES}"}
    t = fit_temperature(z, y)
    conf = confidence(z, t)
    correct = z.argmax(axis=1) == y
    return {
        "temperature": round(t, 6),
        "n": len(y),
        "nll_before": round(nll(z, y, 1.0), 6),
        "nll_after": round(nll(z, y, t), 6),
        "accuracy": round(float(correct.mean()), 6),
        "mean_confidence": round(float(conf.mean()), 6),
        # The holdout's calibrated confidences as quantiles: enough for ATC's threshold
        # (continual.drift.estimate.atc_threshold) without a copy of the holdout.
        "confidence_quantiles": [round(float(q), 6) for q in np.quantile(conf, np.linspace(0, 1, QUANTILES))],
    }


@torch.inference_mode()
def holdout_outputs(
    model: Classifier, store: Store, seqs: np.ndarray, settings: Settings, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, logits, class indices; -1 for a label the model lacks) of the stored samples ``seqs``."""
    index = {c: i for i, c in enumerate(model.classes)}
    transform = load_transform(settings.model.input, train=False, max_pixels=settings.ingest.max_image_pixels)
    was_training = model.training
    model.eval()
    emb, logits, labels = [], [], []
    try:
        for rows in store.iter_samples(seqs=[int(s) for s in seqs], batch_size=256):
            e = model.backbone(torch.stack([decode_row(r, transform) for r in rows]).to(device)).float()
            emb.append(e.cpu().numpy())
            logits.append(model.head(e).float().cpu().numpy())
            labels += [index.get(r.label, -1) for r in rows]
    finally:
        model.train(was_training)
    if not labels:
        return np.empty((0, model.embedding_dim)), np.empty((0, len(index))), np.empty(0, np.int64)
    return np.concatenate(emb), np.concatenate(logits), np.asarray(labels, np.int64)


def calibrate(
    model: Classifier, store: Store, settings: Settings, device: torch.device, *, upto: int, seed: int
) -> tuple[dict[str, Any], Typicality | None]:
    """Fit the temperature and the typicality on a seeded draw of the holdout at or before ``upto``."""
    seqs = store.draw(MAX_SAMPLES, upto=upto, split="holdout", seed=seed)
    if len(seqs) < MIN_SAMPLES:
        return {"temperature": 1.0, "n": len(seqs), "skipped": f"{len(seqs)} holdout samples < {MIN_SAMPLES}"}, None
    emb, logits, labels = holdout_outputs(model, store, seqs, settings, device)
    calibration = calibration_of(logits, labels)
    if "skipped" in calibration:
        return calibration, None
    known = labels >= 0
    try:
        typicality = Typicality.fit(emb[known], labels[known])
    except (np.linalg.LinAlgError, ValueError) as e:  # an add-on: it must never fail the run
        log.warning("no typicality for this candidate: %s", e)
        calibration["typicality"] = {"skipped": str(e)}
        return calibration, None
    calibration["typicality"] = {"threshold": round(typicality.threshold, 6), "dims": len(typicality.components)}
    return calibration, typicality
