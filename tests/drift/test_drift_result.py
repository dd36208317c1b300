from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from continual.drift.result import DriftResult, check_windows, decide, resolve_device


def _result(**overrides: object) -> DriftResult:
    fields = dict(detector="mmd", statistic=0.5, p_value=0.01, effect=0.2, detected=True, n_reference=10, n_current=12)
    fields.update(overrides)
    return DriftResult(**fields)  # type: ignore[arg-type]


def test_to_dict_round_trips_every_field() -> None:
    r = _result(details={"bandwidth": 1.5})
    assert r.to_dict() == {
        "detector": "mmd",
        "statistic": 0.5,
        "p_value": 0.01,
        "effect": 0.2,
        "detected": True,
        "n_reference": 10,
        "n_current": 12,
        "details": {"bandwidth": 1.5},
    }
    assert DriftResult(**r.to_dict()) == r


def test_result_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _result().detected = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("p_value", "effect", "expected"),
    [(0.01, 0.2, True), (0.05, 0.2, False), (0.01, 0.09, False), (0.01, 0.1, True), (0.5, 0.0, False)],
)
def test_decide_needs_significance_and_effect(p_value: float, effect: float, expected: bool) -> None:
    assert decide(p_value, effect, alpha=0.05, min_effect=0.1) is expected


def test_check_windows_names_the_bad_argument() -> None:
    ok = np.zeros((5, 3))
    with pytest.raises(ValueError, match="reference has 3 features but current has 2"):
        check_windows(ok, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="current needs at least 2 samples"):
        check_windows(ok, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="reference contains NaN"):
        check_windows(np.full((5, 3), np.nan), ok)
    with pytest.raises(ValueError, match="current must be a 2-D array"):
        check_windows(ok, np.zeros((5, 3, 1)))
    with pytest.raises(ValueError, match="reference must be numeric"):
        check_windows(np.array([["a"], ["b"]]), ok)
    ref, cur = check_windows(np.arange(4.0), torch.arange(3.0))
    assert ref.shape == (4, 1) and tuple(cur.shape) == (3, 1)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto", np.zeros(3)).type == expected


def test_auto_follows_a_non_cpu_input_and_windows_name_their_minimum() -> None:
    meta = torch.zeros(2, device="meta")  # a non-CPU device that exists without a GPU
    assert resolve_device("auto", np.zeros(2), torch.zeros(2), meta) == torch.device("meta")
    assert resolve_device("auto", torch.zeros(2)) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"^reference needs at least 2 samples, got 1$"):
        check_windows(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"^current needs at least 3 samples, got 2$"):
        check_windows(np.zeros((5, 3)), np.zeros((2, 3)), min_samples=3)
    ref, cur = check_windows(np.zeros((2, 3)), np.zeros((2, 3)))  # exactly the minimum is enough
    assert ref.shape == cur.shape == (2, 3)
