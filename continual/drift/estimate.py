"""Accuracy without labels, and the interval around accuracy with them. Pure functions on arrays.

Both estimators read the confidences the service served (top-class probabilities,
calibrated by the version's temperature, see ``continual.learn.calibrate``):

- ``confidence``: the mean confidence. For a calibrated model P(correct | confidence p) = p,
  so the expected accuracy of a window is its mean confidence — the multiclass form of
  confidence-based performance estimation (CBPE).
- ``atc``: average thresholded confidence (Garg et al., 2022). On the holdout, pick the
  threshold t for which the share of predictions with confidence > t equals the holdout
  accuracy; a window's estimate is its share above t. It needs only the ranking of
  confidences to carry over, not their calibration.

Where they break: both assume that how confident the model is still says how right it
is. Inputs far from the training data (an inverted or transposed image) get wrong
answers with high confidence, so the plain estimates fall by far less than the accuracy
(``bench/delayed.py`` measures it). So each prediction also carries how far its
embedding lies from the version's holdout (``continual.models.typicality``: > 1 is
farther than 99% of the holdout), and both estimates count a far prediction at chance
(1 / number of classes) instead of at its confidence; ``*_plain`` keep the uncorrected
values. Inputs of a class the model does not have are always wrong and, when they look
like a known class, invisible to both. The service flags windows where the estimates
may not hold (:func:`window_flags`): many far inputs, drift detected by the detectors,
labels outside the model's classes, or a version without calibration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def mean_confidence(confidence: Sequence[float] | np.ndarray) -> float:
    """The expected accuracy of a calibrated model: the mean of its top-class probabilities.

    >>> mean_confidence([0.9, 0.8, 0.7, 1.0])
    0.85
    """
    c = _confidences(confidence)
    return round(float(c.mean()), 12)


def atc_threshold(holdout_confidence: Sequence[float] | np.ndarray, holdout_accuracy: float) -> float:
    """The threshold t with share(confidence > t) = ``holdout_accuracy`` on the holdout.

    ``holdout_confidence`` may be the holdout's confidences or evenly spaced quantiles of
    them (what a manifest keeps); t is their ``1 - accuracy`` quantile.

    >>> atc_threshold([0.2, 0.4, 0.6, 0.8, 0.9], 0.6)
    0.52
    """
    c = _confidences(holdout_confidence)
    if not 0.0 <= holdout_accuracy <= 1.0:
        raise ValueError(f"holdout_accuracy must be in [0, 1], got {holdout_accuracy}")
    return round(float(np.quantile(c, 1.0 - holdout_accuracy)), 12)


def atc(confidence: Sequence[float] | np.ndarray, threshold: float) -> float:
    """The estimated accuracy: the share of confidences above ``threshold``.

    >>> atc([0.3, 0.55, 0.7, 0.95], 0.52)
    0.75
    """
    c = _confidences(confidence)
    return float(np.mean(c > threshold))


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``correct / n`` (95% by default); (0, 1) for n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible for small n
    and proportions near 0 or 1.

    >>> lo, hi = wilson_interval(45, 50)
    >>> round(lo, 4), round(hi, 4)
    (0.7864, 0.9565)
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 or 1 the bound is exactly 0 or 1; floating point would land a hair off it.
    lower = 0.0 if correct == 0 else max(0.0, centre - half)
    upper = 1.0 if correct == n else min(1.0, centre + half)
    return lower, upper


def far_share(distance: Sequence[float | None] | np.ndarray | None) -> float | None:
    """The share of predictions farther from the holdout than its 99th percentile (None: no distances known).

    >>> far_share([0.5, 1.5, None, 0.9])
    0.25
    """
    if distance is None:
        return None
    d = np.asarray([np.nan if v is None else v for v in distance], dtype=np.float64)
    return None if np.all(np.isnan(d)) else float(np.mean(d > 1.0))


def estimate_window(
    confidence: Sequence[float] | np.ndarray,
    calibration: Mapping[str, Any] | None,
    distance: Sequence[float | None] | np.ndarray | None = None,
    n_classes: int = 10,
) -> dict[str, float | None]:
    """The estimates for one window: ``atc`` and ``confidence`` count far predictions (distance > 1) at
    chance, ``*_plain`` do not. ``atc*`` are None when the version kept no holdout confidences.

    >>> cal = {"accuracy": 0.6, "confidence_quantiles": [0.2, 0.4, 0.6, 0.8, 0.9]}
    >>> estimate_window([0.3, 0.55, 0.7, 0.95], cal, [0.5, 0.5, 3.0, 0.5], n_classes=4)
    {'atc': 0.5625, 'confidence': 0.5125, 'atc_plain': 0.75, 'confidence_plain': 0.625}
    """
    c = _confidences(confidence)
    far = np.zeros(len(c), bool)
    if distance is not None:
        d = np.asarray([np.nan if v is None else v for v in distance], dtype=np.float64)
        if len(d) != len(c):
            raise ValueError(f"{len(d)} distances for {len(c)} confidences")
        far = d > 1.0  # NaN (unknown) compares False: not far
    chance = 1.0 / n_classes
    out: dict[str, float | None] = {
        "atc": None,
        "confidence": round(float(np.mean(np.where(far, chance, c))), 12),
        "atc_plain": None,
        "confidence_plain": mean_confidence(c),
    }
    quantiles = (calibration or {}).get("confidence_quantiles")
    accuracy = (calibration or {}).get("accuracy")
    if quantiles and isinstance(accuracy, (int, float)):
        above = c > atc_threshold(quantiles, float(accuracy))
        out["atc"] = round(float(np.mean(np.where(far, chance, above))), 12)
        out["atc_plain"] = float(np.mean(above))
    return out


# Above this share of far predictions a window is flagged: ~1% of in-distribution inputs are far by construction.
FAR_FLAG = 0.1


def window_flags(
    calibration: Mapping[str, Any] | None,
    drifted: Iterable[tuple[str, float]] = (),
    unknown_labels: Iterable[str] = (),
    far: float | None = None,
) -> list[str]:
    """Why a window's estimates may not hold: no calibration, far inputs, drift (detector, effect), unknown labels.

    >>> window_flags({"temperature": 1.3, "confidence_quantiles": [0.5, 1.0]}, [("mmd", 0.31)], ["cat"], far=0.4)
    ['far from the training data: 40% of the predictions (counted at chance)', 'drift: mmd effect 0.31 (inputs unlike the training data: confidence may not track accuracy)', "labels outside the model's classes: cat (always wrong, invisible to the estimates)"]
    """
    flags = []
    if not calibration or "confidence_quantiles" not in calibration:
        flags.append("uncalibrated: the version has no holdout calibration (temperature 1, no ATC threshold)")
    if far is not None and far > FAR_FLAG:
        flags.append(f"far from the training data: {far:.0%} of the predictions (counted at chance)")
    for detector, effect in drifted:
        flags.append(
            f"drift: {detector} effect {effect:.3g} (inputs unlike the training data: confidence may not track accuracy)"
        )
    return flags + unknown_labels_flag(unknown_labels)


def unknown_labels_flag(unknown_labels: Iterable[str]) -> list[str]:
    """The flag for true labels the version does not know (known once labels arrive), or none."""
    unknown = sorted(set(unknown_labels))
    if not unknown:
        return []
    shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    return [f"labels outside the model's classes: {shown} (always wrong, invisible to the estimates)"]


def _confidences(values: Sequence[float] | np.ndarray) -> np.ndarray:
    c = np.asarray(values, dtype=np.float64).ravel()
    if not len(c):
        raise ValueError("no confidences")
    if not np.all((c >= 0) & (c <= 1)):
        raise ValueError("confidences must be probabilities in [0, 1]")
    return c
