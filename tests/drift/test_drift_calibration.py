"""Statistical acceptance: false-alarm rate under no drift, power under a small shift, the effect gate."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from continual.drift import KSDetector, LabelShiftDetector, MMDDetector, PredictionShiftDetector

DIM, FACTORS = 256, 32
_mix = np.random.default_rng(2024)
LOADINGS = _mix.normal(size=(FACTORS, DIM)) / np.sqrt(FACTORS)
SCALES = np.exp(_mix.normal(0.0, 1.0, size=DIM))
NOISE = 0.7


def _softplus(x: np.ndarray) -> np.ndarray:
    # Pre-activations here stay far below exp's overflow; logaddexp is several times slower.
    return np.log1p(np.exp(x))


def _feature_sd() -> np.ndarray:
    # Exact sd of softplus(N(0, v)) * scale per feature, by Gauss–Hermite quadrature.
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    weights = weights / weights.sum()
    sd = np.sqrt((LOADINGS**2).sum(0) + NOISE**2)
    values = _softplus(nodes[:, None] * sd[None, :])
    mean = weights @ values
    return np.sqrt(weights @ (values - mean) ** 2) * SCALES


FEATURE_SD = _feature_sd()


def embeddings(rng: np.random.Generator, n: int, shift: float = 0.0, fraction: float = 0.1) -> np.ndarray:
    """Embedding-like windows: correlated through latent factors, non-negative and skewed
    like post-activation features, scales spread over an order of magnitude. ``shift``
    moves the mean of the first ``fraction`` of the features by that many sd."""
    hidden = rng.normal(size=(n, FACTORS)) @ LOADINGS + NOISE * rng.normal(size=(n, DIM))
    x = _softplus(hidden) * SCALES
    k = round(fraction * DIM)
    x[:, :k] += shift * FEATURE_SD[:k]
    return x


def test_generator_shift_is_in_standard_deviations() -> None:
    np.testing.assert_allclose(embeddings(np.random.default_rng(0), 20_000).std(0), FEATURE_SD, rtol=0.04)
    # Same seed, same draws: the difference is exactly the requested shift.
    base = embeddings(np.random.default_rng(1), 10)
    moved = embeddings(np.random.default_rng(1), 10, shift=0.2)
    delta = (moved - base) / FEATURE_SD
    np.testing.assert_allclose(delta[:, :26], 0.2)
    np.testing.assert_allclose(delta[:, 26:], 0.0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Hundreds of small checks: on a shared 2-core box, torch's second thread mostly
    # waits on the first, so these loops run several times faster on one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_false_alarm_rate_under_no_drift() -> None:
    rng = np.random.default_rng(7)
    mmd, ks = MMDDetector(permutations=200), KSDetector()
    alarms = {"mmd": 0, "ks": 0}
    for _ in range(200):
        ref, cur = embeddings(rng, 500), embeddings(rng, 500)
        alarms["mmd"] += mmd.check(ref, cur).p_value < 0.05
        alarms["ks"] += ks.check(ref, cur).p_value < 0.05
    rates = {name: count / 200 for name, count in alarms.items()}
    print(f"false-alarm rates at alpha=0.05: {rates}")
    assert rates["mmd"] <= 0.08
    assert rates["ks"] <= 0.08


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_power_against_small_shift_in_few_dimensions() -> None:
    # 0.2 sd in 26 of 256 features: an RMS shift of 0.064 sd, MMD effect ~0.035.
    rng = np.random.default_rng(11)
    mmd, ks = MMDDetector(permutations=200), KSDetector()
    hits = {"mmd": 0, "ks": 0}
    for _ in range(50):
        ref, cur = embeddings(rng, 1000), embeddings(rng, 1000, shift=0.2)
        hits["mmd"] += mmd.check(ref, cur).detected
        hits["ks"] += ks.check(ref, cur).detected
    rates = {name: count / 50 for name, count in hits.items()}
    print(f"detection rates (p < alpha and effect >= min_effect): {rates}")
    assert rates["mmd"] >= 0.9
    assert rates["ks"] >= 0.9


@pytest.mark.slow
def test_effect_gate_at_twenty_thousand_samples() -> None:
    rng = np.random.default_rng(5)
    n = 20_000
    # 0.02 sd in every feature: real, and at this size overwhelmingly significant, but negligible.
    ref, cur = embeddings(rng, n, fraction=1.0), embeddings(rng, n, shift=0.02, fraction=1.0)
    mmd = MMDDetector(permutations=100).check(ref, cur)
    assert mmd.details["method"] == "rff"
    assert mmd.p_value == 1 / 101 and mmd.effect < mmd.details["min_effect"] and not mmd.detected
    # 0.05 sd in a tenth of the features, for the per-feature test.
    ks = KSDetector().check(ref, embeddings(rng, n, shift=0.05))
    assert ks.p_value < 1e-6 and ks.effect < 0.1 and not ks.detected

    labels = rng.choice(5, size=n, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    moved = rng.choice(5, size=n, p=[0.28, 0.25, 0.2, 0.15, 0.12])
    label = LabelShiftDetector().check(labels, moved)
    assert label.p_value < 1e-6 and label.effect < 0.1 and not label.detected
    confidence, lower = rng.beta(8, 2, size=n), rng.beta(7.6, 2, size=n)
    pred = PredictionShiftDetector().check(labels, moved, confidence, lower)
    assert pred.p_value < 1e-6 and pred.effect < 0.1 and not pred.detected
