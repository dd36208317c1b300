from __future__ import annotations

import numpy as np
import pytest
import torch

from continual.drift import MMDDetector
from continual.drift import mmd as mmd_module


def _windows(seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref, same, shifted = (rng.normal(size=(200, 20)) for _ in range(3))
    shifted[:, :4] += 0.5
    return ref, same, shifted


def _brute_force_mmd2(x: np.ndarray, y: np.ndarray, h: float) -> tuple[float, float]:
    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * h**2))

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    unbiased = (kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - m) / (m * (m - 1)) - 2 * kxy.mean()
    return unbiased, kxx.mean() + kyy.mean() - 2 * kxy.mean()


def test_golden_exact() -> None:
    ref, same, shifted = _windows()
    detector = MMDDetector(permutations=200, seed=0)
    quiet, loud = detector.check(ref, same), detector.check(ref, shifted)
    assert (quiet.detected, quiet.p_value, quiet.effect) == (False, 161 / 201, 0.0)
    assert quiet.statistic == pytest.approx(-0.000804335, rel=1e-4)
    assert (loud.detected, loud.p_value) == (True, 1 / 201)
    assert loud.statistic == pytest.approx(0.0137789, rel=1e-4)
    assert loud.effect == pytest.approx(0.117383, rel=1e-4)
    assert loud.details["method"] == "exact"
    assert (loud.n_reference, loud.n_current) == (200, 200)


def test_golden_random_features() -> None:
    ref, same, shifted = _windows()
    detector = MMDDetector(permutations=200, seed=0, exact_max_n=100, rff_features=512)
    quiet, loud = detector.check(ref, same), detector.check(ref, shifted)
    assert (quiet.detected, quiet.details["method"]) == (False, "rff")
    assert quiet.p_value > 0.5
    assert (loud.detected, loud.p_value) == (True, 1 / 201)


def test_statistic_matches_brute_force_kernel() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 5)), rng.normal(0.3, 1.0, size=(45, 5))
    r = MMDDetector(permutations=10, bandwidth=2.0, standardize=False).check(x, y)
    unbiased, biased = _brute_force_mmd2(x, y, 2.0)
    assert r.statistic == pytest.approx(unbiased, rel=1e-5)
    assert r.details["mmd2_biased"] == pytest.approx(biased, rel=1e-5)
    assert r.effect == pytest.approx(np.sqrt(unbiased), rel=1e-5)


def test_random_features_approximate_the_exact_statistic() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 10)), rng.normal(0.4, 1.0, size=(300, 10))
    exact = MMDDetector(permutations=20).check(x, y)
    approx = MMDDetector(permutations=20, exact_max_n=10, rff_features=8192).check(x, y)
    assert approx.details["bandwidth"] == exact.details["bandwidth"]
    assert approx.statistic == pytest.approx(exact.statistic, rel=0.1)


def test_p_value_uses_plus_one_correction() -> None:
    ref, _, shifted = _windows()
    r = MMDDetector(permutations=9, seed=3).check(ref, shifted + 3.0)
    assert r.p_value == pytest.approx(0.1)  # (1 + 0) / (1 + 9): never exactly zero
    same = MMDDetector(permutations=99).check(ref, ref)
    assert same.p_value > 0.5 and not same.detected


def test_fixed_seed_gives_identical_results_and_tensors_work() -> None:
    ref, _, shifted = _windows()
    a = MMDDetector(permutations=50, seed=7).check(ref, shifted)
    b = MMDDetector(permutations=50, seed=7).check(torch.from_numpy(ref), torch.from_numpy(shifted).float())
    assert a.to_dict() == b.to_dict()


def test_effect_gate_suppresses_significant_but_small_shift() -> None:
    ref, _, shifted = _windows()
    r = MMDDetector(permutations=50, min_effect=0.5).check(ref, shifted)
    assert r.p_value < 0.05 and r.effect < 0.5 and not r.detected


def test_large_windows_never_build_the_pooled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = mmd_module._sq_dists

    def spy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0] * y.shape[0])
        return original(x, y)

    def forbidden(*args: object) -> None:
        raise AssertionError("exact kernel built above exact_max_n")

    monkeypatch.setattr(mmd_module, "_sq_dists", spy)
    monkeypatch.setattr(mmd_module, "_KernelSums", forbidden)
    rng = np.random.default_rng(0)
    r = MMDDetector(permutations=20, exact_max_n=1000, bandwidth_sample=100).check(
        rng.normal(size=(3000, 8)), rng.normal(size=(3000, 8))
    )
    assert r.details["method"] == "rff" and not r.detected
    assert max(sizes) == 100 * 100  # only the bandwidth subsample


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"min_effect": -0.1}, "min_effect"),
        ({"permutations": 0}, "permutations"),
        ({"exact_max_n": 2}, "exact_max_n"),
        ({"rff_features": 3}, "rff_features"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"bandwidth_sample": 1}, "bandwidth_sample"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MMDDetector(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    ref, _, shifted = _windows()
    cpu = MMDDetector(permutations=100, device="cpu").check(ref, shifted)
    gpu = MMDDetector(permutations=100, device="cuda").check(ref, shifted)
    assert gpu.details["device"].startswith("cuda")
    assert gpu.statistic == pytest.approx(cpu.statistic, rel=1e-3)
    assert gpu.p_value == pytest.approx(cpu.p_value, abs=0.02)


def test_defaults_boundaries_and_the_result_in_full() -> None:
    d = MMDDetector()
    assert (d.alpha, d.min_effect, d.permutations, d.exact_max_n, d.rff_features) == (0.05, 0.02, 500, 10_000, 2048)
    assert (d.bandwidth, d.bandwidth_sample, d.standardize, d.seed) == (None, 1000, True, 0)
    # The smallest values each check allows.
    MMDDetector(permutations=1, exact_max_n=4, rff_features=2, bandwidth=0.5, bandwidth_sample=2)
    rng = np.random.default_rng(1)
    ref, cur = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    ref[:, 2] = cur[:, 2] = 1.0  # a constant feature: standardising must not divide by its zero spread
    exact = MMDDetector(permutations=30, exact_max_n=40).check(ref, cur)  # 40 pooled = exact_max_n: exact
    assert exact.detector == "mmd" and np.isfinite(exact.statistic) and exact.p_value == pytest.approx(6 / 31)
    details = {k: v for k, v in exact.details.items() if k not in {"mmd2_biased", "bandwidth"}}
    assert details == {
        "method": "exact", "permutations": 30, "rff_features": None, "standardized": True, "device": "cpu",
        "alpha": 0.05, "min_effect": 0.02,
    }  # fmt: skip
    assert exact.details["bandwidth"] == pytest.approx(1.5552288, rel=1e-5)
    rff = MMDDetector(permutations=30, exact_max_n=39, rff_features=64).check(ref, cur)
    assert (rff.details["method"], rff.details["rff_features"]) == ("rff", 64)
    assert MMDDetector(permutations=30, standardize=False).check(ref, cur).details["standardized"] is False


def test_ties_with_the_observed_statistic_count_as_extreme() -> None:
    same = np.zeros((10, 2))  # every permutation's statistic equals the observed one
    assert MMDDetector(permutations=10).check(same, same).p_value == 1.0
    assert MMDDetector(permutations=7, exact_max_n=4, rff_features=8).check(same, same).p_value == 1.0
