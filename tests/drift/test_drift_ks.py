from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from continual.drift import KSDetector
from continual.drift.ks import benjamini_hochberg, ks_statistics


def _windows(seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref, same, shifted = (rng.normal(size=(200, 20)) for _ in range(3))
    shifted[:, :4] += 0.5
    return ref, same, shifted


def test_golden() -> None:
    ref, same, shifted = _windows()
    quiet, loud = KSDetector().check(ref, same), KSDetector().check(ref, shifted)
    assert (quiet.detected, quiet.effect, quiet.statistic) == (False, 0.145, 0.145)
    assert quiet.p_value == pytest.approx(0.5359405686842091, rel=1e-9)
    assert (loud.detected, loud.effect) == (True, 0.225)
    assert loud.p_value == pytest.approx(0.0006264659950105309, rel=1e-9)
    assert loud.details["worst_feature"] < 4
    assert (loud.n_reference, loud.n_current, loud.details["features"]) == (200, 200, 20)


def test_statistics_and_p_values_match_scipy_including_ties() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 12)), rng.normal(0.1, 1.0, size=(250, 12))
    x[:50, 3], y[:40, 3] = 0.0, 0.0  # a spike of ties, as post-ReLU features have
    x[:, 5], y[:, 5] = np.round(x[:, 5]), np.round(y[:, 5])  # a discrete feature
    expected = [stats.ks_2samp(x[:, j], y[:, j], method="asymp") for j in range(12)]
    d = ks_statistics(x, y)
    np.testing.assert_allclose(d, [e.statistic for e in expected], rtol=0, atol=1e-15)
    p = stats.kstwo.sf(d, round(300 * 250 / 550))
    np.testing.assert_allclose(p, [e.pvalue for e in expected], rtol=1e-10)


def test_benjamini_hochberg_matches_scipy() -> None:
    p = np.random.default_rng(3).uniform(size=50) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)


def test_reported_p_value_is_smallest_adjusted() -> None:
    ref, _, shifted = _windows()
    r = KSDetector().check(ref, shifted)
    p = stats.kstwo.sf(ks_statistics(ref, shifted), 100)
    assert r.p_value == pytest.approx(benjamini_hochberg(p).min(), rel=1e-12)
    assert r.details["significant_features"] == int((benjamini_hochberg(p) < 0.05).sum())


def test_effect_gate() -> None:
    ref, _, shifted = _windows()
    r = KSDetector(min_effect=0.3).check(ref, shifted)
    assert r.p_value < 0.05 and not r.detected


@pytest.mark.parametrize("projection", ["random", "pca"])
def test_projection_reduces_features_and_keeps_detecting(projection: str) -> None:
    rng = np.random.default_rng(1)
    ref, same, cur = rng.normal(size=(400, 64)), rng.normal(size=(400, 64)), rng.normal(size=(400, 64))
    cur += 0.4  # along every axis, so any projection sees it
    detector = KSDetector(max_features=8, projection=projection, seed=3)
    loud = detector.check(ref, cur)
    assert loud.details["features"] == 8 and loud.details["projection"] == projection
    assert loud.detected
    assert not detector.check(ref, same).detected
    assert detector.check(ref, cur).to_dict() == loud.to_dict()


def test_no_projection_when_already_narrow() -> None:
    ref, same, _ = _windows()
    r = KSDetector(max_features=64).check(ref, same)
    assert r.details["projection"] is None and r.details["features"] == 20


def test_accepts_tensors_and_one_feature() -> None:
    ref, _, shifted = _windows()
    a = KSDetector().check(torch.from_numpy(ref), torch.from_numpy(shifted))
    assert a.to_dict() == KSDetector().check(ref, shifted).to_dict()
    assert KSDetector().check(ref[:, 0], shifted[:, 0]).details["features"] == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 1.0}, "alpha"),
        ({"min_effect": -1}, "min_effect"),
        ({"max_features": 0}, "max_features"),
        ({"projection": "umap"}, "projection"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        KSDetector(**kwargs)  # type: ignore[arg-type]


def test_mismatched_windows_rejected() -> None:
    with pytest.raises(ValueError, match="features"):
        KSDetector().check(np.zeros((5, 3)), np.zeros((5, 4)))


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.int64, st.tuples(st.integers(1, 25), st.just(3)), elements=st.integers(0, 4)),
    y=hnp.arrays(np.int64, st.tuples(st.integers(1, 25), st.just(3)), elements=st.integers(0, 4)),
)
def test_statistics_match_scipy_on_heavily_tied_data(x: np.ndarray, y: np.ndarray) -> None:
    expected = [stats.ks_2samp(x[:, j], y[:, j]).statistic for j in range(3)]
    np.testing.assert_allclose(ks_statistics(x.astype(float), y.astype(float)), expected, atol=1e-12)


def test_pca_basis_is_the_top_axes_of_the_centred_pooled_sample() -> None:
    rng = np.random.default_rng(3)
    # Spread 10 / 3 / 0.1 along axes 0 / 1 / 2, and a large mean on axis 2: centring must remove it.
    scale, mean = np.array([10.0, 3.0, 0.1]), np.array([0.0, 0.0, 50.0])
    ref, cur = rng.normal(size=(400, 3)) * scale + mean, rng.normal(size=(300, 3)) * scale + mean
    basis = KSDetector(max_features=2, projection="pca")._basis(ref, cur, 2)
    assert basis.shape == (3, 2)
    np.testing.assert_allclose(np.abs(basis), [[1, 0], [0, 1], [0, 0]], atol=0.02)
    # Feature means of different sizes: centring is per feature, not by one grand mean.
    shifted = np.array([0.0, 40.0, -40.0])
    again = KSDetector(projection="pca")._basis(ref + shifted, cur + shifted, 2)
    np.testing.assert_allclose(np.abs(again), np.abs(basis), atol=1e-6)


def test_random_basis_ignores_the_data() -> None:
    rng = np.random.default_rng(4)
    det = KSDetector(max_features=3, projection="random", seed=7)
    a = det._basis(rng.normal(size=(50, 8)), rng.normal(size=(40, 8)), 3)
    b = det._basis(rng.normal(size=(60, 8)) * 100, rng.normal(size=(30, 8)), 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-12)


def test_edges_one_sample_one_feature_axis_and_exactly_k_features() -> None:
    rng = np.random.default_rng(5)
    ref, cur = rng.normal(size=(30, 3)), rng.normal(size=(1, 3))
    r = KSDetector(alpha=0.01, min_effect=0.2).check(ref, cur)  # one current sample is a window
    assert (r.detector, r.n_reference, r.n_current) == ("ks", 30, 1)
    assert (r.details["alpha"], r.details["min_effect"]) == (0.01, 0.2)
    one_axis = KSDetector(max_features=1, projection="pca").check(ref, rng.normal(size=(20, 3)))
    assert one_axis.details["features"] == 1 and one_axis.details["projection"] == "pca"
    # Exactly max_features features: nothing to reduce, the features are tested as they are.
    exact = KSDetector(max_features=3).check(ref, cur)
    assert exact.details["projection"] is None and exact.statistic == r.statistic
    # The default seed is 0: the same random axes as asking for seed 0.
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    assert KSDetector(max_features=2).check(a, b) == KSDetector(max_features=2, seed=0).check(a, b)
    # A tensor that requires grad is detached, not refused.
    t = torch.tensor(a, requires_grad=True)
    assert KSDetector().check(t, b).statistic == KSDetector().check(a, b).statistic
