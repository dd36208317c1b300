from __future__ import annotations

import math

import pytest
import torch

from continual.learn.distill import distillation_loss


def logits(seed: int, n: int = 16, c: int = 5) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


def test_zero_exactly_when_the_student_equals_the_teacher() -> None:
    z = logits(0)
    for t in (0.5, 1.0, 2.0, 7.0):
        assert distillation_loss(z, z, n_old=5, temperature=t).item() == 0.0
    # The new classes' logits do not count, whatever they are.
    grown = torch.cat([z, logits(1, c=2) * 100], dim=1)
    assert distillation_loss(grown, z, n_old=5).item() == 0.0
    # A shift common to all old logits changes no probability.
    assert distillation_loss(z + 4.0, z, n_old=5).item() == pytest.approx(0.0, abs=1e-6)


def test_matches_the_hand_written_formula() -> None:
    s, t, temp = logits(2), logits(3, c=3), 2.0
    p_t = torch.softmax(t / temp, 1)
    log_p_s = torch.log_softmax(s[:, :3] / temp, 1)
    expected = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean() * temp**2
    got = distillation_loss(s, t, n_old=3, temperature=temp)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > 0


def test_one_sample_by_hand() -> None:
    # Teacher (0, ln 3) at T = 1: p_t = (1/4, 3/4); student (0, 0): p_s = (1/2, 1/2).
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    got = distillation_loss(torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]]), n_old=2, temperature=1.0)
    assert got.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


def test_gradient_reaches_the_student_only_and_pulls_towards_the_teacher() -> None:
    s = logits(4).requires_grad_(True)
    t = logits(5, c=3).requires_grad_(True)
    loss = distillation_loss(s, t, n_old=3)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and torch.equal(s.grad[:, 3:], torch.zeros(16, 2))
    with torch.no_grad():
        stepped = s - 0.5 * s.grad
    assert distillation_loss(stepped, t, n_old=3).item() < loss.item()


def test_bad_arguments_name_what_is_wrong() -> None:
    z = logits(0)
    with pytest.raises(ValueError, match="n_old must be >= 1, got 0"):
        distillation_loss(z, z, n_old=0)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        distillation_loss(z, z, n_old=2, temperature=0)
    with pytest.raises(ValueError, match="n_old = 6 but student has 5"):
        distillation_loss(z, z, n_old=6)
    with pytest.raises(ValueError, match="batches differ: 16 vs 4"):
        distillation_loss(z, z[:4], n_old=2)
    with pytest.raises(ValueError, match="must be \\[batch, classes\\]"):
        distillation_loss(z[0], z[0], n_old=2)
    assert distillation_loss(z[:0], z[:0], n_old=2).item() == 0.0
