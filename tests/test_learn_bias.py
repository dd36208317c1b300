from __future__ import annotations

import pytest
import torch
from torch import nn

from continual.learn.bias import apply_bias_correction, fit_bias_correction, fold_bias_correction, new_class_mask

MASK = new_class_mask(3, 5)  # classes 0-2 old, 3-4 new


def calibrated(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from the logits' own softmax: the best correction for them is (1, 0)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, y


def test_recovers_a_known_distortion_of_the_new_logits() -> None:
    z, y = calibrated(20_000)
    # The new classes' logits come out doubled and shifted up by 3 (a head biased towards them).
    biased = apply_bias_correction(z, MASK, 2.0, 3.0)
    alpha, beta = fit_bias_correction(biased, y, MASK, balanced=False, l2=0.0)
    # The inverse of z -> 2z + 3 is z -> 0.5z - 1.5.
    assert alpha == pytest.approx(0.5, abs=0.02) and beta == pytest.approx(-1.5, abs=0.06)
    # And the calibrated logits need no correction.
    a0, b0 = fit_bias_correction(z, y, MASK, balanced=False, l2=0.0)
    assert a0 == pytest.approx(1.0, abs=0.03) and b0 == pytest.approx(0.0, abs=0.06)


def test_correction_gives_back_the_old_classes_their_samples() -> None:
    z, y = calibrated(3000, seed=1)
    biased = apply_bias_correction(z, MASK, 1.0, 4.0)
    old = y < 3
    before = (biased.argmax(1) == y)[old].float().mean()
    alpha, beta = fit_bias_correction(biased, y, MASK)
    after = (apply_bias_correction(biased, MASK, alpha, beta).argmax(1) == y)[old].float().mean()
    assert before < 0.3 < after - 0.2
    assert beta < -2.0


def test_balanced_weighting_ignores_how_many_samples_a_class_has() -> None:
    z, y = calibrated(600, seed=2)
    biased = apply_bias_correction(z, MASK, 1.5, 2.0)
    old = y < 3
    # Ten copies of every old-class sample: each class still weighs the same when balanced.
    z10 = torch.cat([biased, *[biased[old]] * 9])
    y10 = torch.cat([y, *[y[old]] * 9])
    one = fit_bias_correction(biased, y, MASK)
    ten = fit_bias_correction(z10, y10, MASK)
    assert one == pytest.approx(ten, abs=1e-4)
    assert fit_bias_correction(z10, y10, MASK, balanced=False) != pytest.approx(one, abs=1e-2)


def test_a_separable_slice_still_gives_a_finite_positive_scale() -> None:
    z = torch.tensor([[5.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0, 6.0]])
    alpha, beta = fit_bias_correction(z, torch.tensor([0, 3, 4]), MASK)
    assert 0 < alpha < 100 and abs(beta) < 100
    assert (alpha, beta) == fit_bias_correction(z, torch.tensor([0, 3, 4]), MASK)  # deterministic


def test_apply_changes_only_the_new_logits() -> None:
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    out = apply_bias_correction(z, MASK, 0.5, -1.0)
    assert torch.equal(out[:, :3], z[:, :3])
    torch.testing.assert_close(out[:, 3:], 0.5 * z[:, 3:] - 1.0)


@pytest.mark.parametrize("bias", [True, False])
def test_folding_into_the_head_gives_the_corrected_logits(bias: bool) -> None:
    torch.manual_seed(4)
    head = nn.Linear(8, 5, bias=bias)
    e = torch.randn(64, 8)
    folded = fold_bias_correction(head, MASK, 0.7, -0.4)
    with torch.no_grad():
        torch.testing.assert_close(folded(e), apply_bias_correction(head(e), MASK, 0.7, -0.4))
    assert torch.equal(folded.weight[:3], head.weight[:3])
    if bias:
        assert torch.equal(folded.bias[:3], head.bias[:3])
    assert not torch.equal(folded.weight[3:], head.weight[3:])


def test_bad_arguments_name_what_is_wrong() -> None:
    z, y = calibrated(50)
    with pytest.raises(ValueError, match="new_mask must be a bool tensor of shape \\[5\\]"):
        fit_bias_correction(z, y, torch.tensor([0, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="some but not all"):
        apply_bias_correction(z, torch.zeros(5, dtype=torch.bool), 1.0, 0.0)
    with pytest.raises(ValueError, match="labels must have shape \\[50\\]"):
        fit_bias_correction(z, y[:3], MASK)
    with pytest.raises(ValueError, match="class indices in \\[0, 5\\)"):
        fit_bias_correction(z, torch.full((50,), 7), MASK)
    with pytest.raises(ValueError, match="both old and new classes, got 0 new of 50"):
        fit_bias_correction(z, torch.zeros(50, dtype=torch.long), MASK)
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        fit_bias_correction(z, y, MASK, l2=-1)
    with pytest.raises(ValueError, match="n_old must be in \\[0, n_classes=5\\], got 6"):
        new_class_mask(6, 5)
