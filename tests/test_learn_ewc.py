from __future__ import annotations

import pytest
import torch
from torch import nn

from continual.learn.ewc import EwcTerm, anchor_of, combine_fisher, ewc_penalty, fisher_diagonal


class Tiny(nn.Module):
    """Classifier-shaped: a backbone, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _ones_fisher(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(p) for n, p in model.named_parameters()}


def test_penalty_is_zero_at_the_anchor_and_grows_quadratically() -> None:
    model = _model()
    anchor = anchor_of(model)
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    assert float(ewc_penalty(model, anchor, fisher).detach()) == 0.0
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    values = []
    for scale in (1.0, 2.0, 3.0):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(anchor[n] + scale * 0.01 * direction[n])
        values.append(float(ewc_penalty(model, anchor, fisher).detach()))
    assert values[0] > 0
    assert values[1] == pytest.approx(4 * values[0], rel=1e-4)
    assert values[2] == pytest.approx(9 * values[0], rel=1e-4)
    # The exact value: 1/2 * sum F * d^2.
    expected = 0.5 * sum(float((fisher[n] * (0.03 * direction[n]) ** 2).sum()) for n in fisher)
    assert values[2] == pytest.approx(expected, rel=1e-4)


def test_penalty_respects_frozen_parameters() -> None:
    model = _model()
    anchor = anchor_of(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    fisher = _ones_fisher(model)
    full = float(ewc_penalty(model, anchor, fisher).detach())
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    head_only = float(ewc_penalty(model, anchor, fisher).detach())
    n_head = sum(p.numel() for p in model.head.parameters())
    assert head_only == pytest.approx(0.5 * n_head * 0.01, rel=1e-4)
    assert head_only < full
    term = EwcTerm(model, anchor, fisher)
    loss = term()
    assert float(loss.detach()) == pytest.approx(head_only, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_penalty_skips_params_without_fisher_or_with_another_shape() -> None:
    model = _model()
    anchor = anchor_of(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    fisher = {"head.weight": torch.ones(7, 7)}  # a head of another size (classes changed)
    assert float(ewc_penalty(model, anchor, fisher).detach()) == 0.0
    assert len(EwcTerm(model, anchor, fisher)) == 0


def test_fisher_has_the_trainable_shapes_and_matches_the_per_sample_formula() -> None:
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    fisher, n = fisher_diagonal(head, [(x[:8], y[:8]), (x[8:], y[8:])], max_samples=100)
    assert n == 20
    assert set(fisher) == {"weight", "bias"}
    assert fisher["weight"].shape == head.weight.shape and fisher["bias"].shape == head.bias.shape
    # Per-sample empirical Fisher of softmax regression: grad log p(y|x) = (onehot(y) - p) x^T.
    with torch.no_grad():
        p = torch.softmax(head(x), dim=-1)
        g = torch.nn.functional.one_hot(y, 3).float() - p
        expected_w = torch.einsum("nk,nd->nkd", g, x).pow(2).mean(0)
        expected_b = g.pow(2).mean(0)
    torch.testing.assert_close(fisher["weight"], expected_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fisher["bias"], expected_b, rtol=1e-4, atol=1e-6)


def test_fisher_covers_only_trainable_params_and_caps_samples() -> None:
    model = _model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    fisher, n = fisher_diagonal(model, [(x[:25], y[:25]), (x[25:], y[25:])], max_samples=30, prefix="")
    assert n == 30
    assert set(fisher) == {"head.weight", "head.bias"}
    assert all((f >= 0).all() for f in fisher.values())


def test_online_combination_decays_the_old_fisher() -> None:
    old = {"w": torch.full((2, 2), 4.0), "frozen_now": torch.ones(3)}
    new = {"w": torch.ones(2, 2), "b": torch.full((2,), 2.0)}
    out = combine_fisher(old, new, 0.5)
    torch.testing.assert_close(out["w"], torch.full((2, 2), 3.0))
    torch.testing.assert_close(out["b"], torch.full((2,), 2.0))
    torch.testing.assert_close(out["frozen_now"], torch.full((3,), 0.5))
    assert combine_fisher(None, new, 0.9).keys() == new.keys()
    reshaped = combine_fisher({"w": torch.ones(5)}, new, 0.9)
    torch.testing.assert_close(reshaped["w"], new["w"])
    with pytest.raises(ValueError, match="fisher_decay"):
        combine_fisher(old, new, 1.5)


def test_ewc_pulls_a_trained_parameter_back() -> None:
    # Train one weight towards 5 from an anchor at 0; with a strong penalty it stays close to 0.
    def fit(lam: float) -> float:
        w = nn.Parameter(torch.zeros(1))
        model = nn.Module()
        model.w = w  # type: ignore[assignment]
        anchor, fisher = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
        opt = torch.optim.SGD([w], lr=0.05)
        for _ in range(500):
            loss = (w - 5).pow(2).sum() + lam * ewc_penalty(model, anchor, fisher)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(w)

    assert fit(0.0) == pytest.approx(5.0, abs=1e-3)
    # Optimum of (w-5)^2 + lam/2 w^2 is 10 / (2 + lam).
    assert fit(18.0) == pytest.approx(0.5, abs=1e-3)


def test_vectorized_and_per_sample_loop_fisher_agree() -> None:
    from continual.config import ModelSettings
    from continual.models import build_model

    torch.manual_seed(1)
    model = build_model(
        ModelSettings(
            architecture="mlp", weights="none", mode="all", hidden=(8, 8), input={"kind": "vector", "shape": [6]}
        )
    )
    x, y = torch.randn(24, 6), torch.randint(0, 10, (24,))
    fast, n1 = fisher_diagonal(model, [(x, y)], max_samples=24, vectorized=True)
    slow, n2 = fisher_diagonal(model, [(x, y)], max_samples=24, vectorized=False)
    assert n1 == n2 == 24 and fast.keys() == slow.keys() == dict(model.named_parameters()).keys()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-7)


def test_direct_penalty_gradient_equals_autograd() -> None:
    model = _model(3)
    anchor = anchor_of(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for p in model.backbone[0].parameters():
        p.requires_grad_(False)
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    term = EwcTerm(model, anchor, fisher)
    (2.5 * term()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    term.add_grad_(2.5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() == {"head.weight", "head.bias"}
    for n in got:
        torch.testing.assert_close(got[n], expected[n])


def test_the_term_moves_anchor_and_fisher_to_the_parameters_device_and_dtype() -> None:
    # "meta" tensors have a device of their own without a GPU: a missing .to(device) shows.
    model = _model().to(torch.float64)
    anchor, fisher = anchor_of(_model()), _ones_fisher(_model())  # float32 on the CPU
    term = EwcTerm(model, anchor, fisher)
    assert {t.dtype for t in term.anchors + term.fishers} == {torch.float64}
    on_meta = EwcTerm(_model().to("meta"), anchor, fisher)
    assert {t.device.type for t in on_meta.anchors + on_meta.fishers} == {"meta"}
    assert {t.dtype for t in on_meta.anchors + on_meta.fishers} == {torch.float32}


def test_the_term_with_nothing_to_penalise_is_a_scalar_zero_on_the_models_device() -> None:
    one = nn.Linear(3, 1, bias=False).to("meta")  # a single parameter
    one.weight.requires_grad_(False)
    zero = EwcTerm(one, {"weight": torch.zeros(1, 3)}, {"weight": torch.ones(1, 3)})()
    assert zero.shape == () and zero.device.type == "meta"
    empty = EwcTerm(_model(), {}, {})
    assert len(empty) == 0 and empty().shape == () and float(empty()) == 0.0


def test_combine_fisher_edges_of_decay_and_dtypes() -> None:
    new = {"w": torch.full((2,), 2.0)}
    old = {"w": torch.full((2,), 4.0, dtype=torch.float64), "frozen": torch.full((3,), 8.0)}
    out = combine_fisher(old, new, 1.0)  # decay 1 is allowed: nothing is forgotten
    assert out["w"].dtype == torch.float32 and out["w"].tolist() == [6.0, 6.0]
    assert out["frozen"].tolist() == [8.0, 8.0, 8.0]
    out = combine_fisher(old, new, 0.0)  # decay 0 too: only this run counts
    assert out["w"].tolist() == [2.0, 2.0] and out["frozen"].tolist() == [0.0, 0.0, 0.0]
    out = combine_fisher(old, new, 0.5)
    assert out["w"].tolist() == [4.0, 4.0] and out["frozen"].tolist() == [4.0, 4.0, 4.0]
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="fisher_decay"):
            combine_fisher(old, new, bad)


def test_the_per_sample_loop_gives_unused_parameters_a_zero_fisher() -> None:
    class WithSpare(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Parameter(torch.ones(2))  # trainable, never used in forward

    torch.manual_seed(0)
    model = WithSpare()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    looped, n = fisher_diagonal(model, [(x, y)], max_samples=6, vectorized=False)
    assert n == 6 and torch.equal(looped["spare"], torch.zeros(2))
    assert float(looped["head.weight"].sum()) > 0


def test_fisher_edges_one_sample_the_cap_between_batches_and_float32_out() -> None:
    torch.manual_seed(0)
    model = _model().to(torch.float64)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    one, n = fisher_diagonal(model, [(x[:1], y[:1])], max_samples=10)
    assert n == 1 and {f.dtype for f in one.values()} == {torch.float32}  # float32 whatever the model's dtype
    capped, n = fisher_diagonal(model, [(x[:2], y[:2]), (x[2:], y[2:])], max_samples=2)
    assert n == 2
    first, _ = fisher_diagonal(model, [(x[:2], y[:2])], max_samples=2)
    assert all(torch.equal(capped[k], first[k]) for k in first)
    with pytest.raises(ValueError, match=r"^fisher_diagonal got no samples$"):
        fisher_diagonal(model, [], max_samples=5)
