from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from continual.config import ModelSettings, TrainingSettings
from continual.learn.schedule import apply_phase, lr_factor, make_optimizer, param_groups, phase_mode
from continual.models import build_model


def _model(**kw: object) -> nn.Module:
    settings = ModelSettings(
        architecture="mlp", weights="none", mode="all", hidden=(16, 8, 8), input={"kind": "vector", "shape": [6]}
    )
    # What trains in each mode does not depend on the weights; the config refuses a frozen random
    # base (weights "none" + feature_extraction) only because training one is pointless.
    settings = settings.model_copy(update={"mode": "feature_extraction", **kw})
    return build_model(settings), settings


def _grads_after_step(model: nn.Module) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 6)).sum().backward()
    return {n: p.grad is not None for n, p in model.named_parameters()}


def test_phase_is_head_only_during_warmup_then_the_configured_mode() -> None:
    fine = ModelSettings(mode="fine_tune", unfreeze_last=2)
    assert phase_mode(0, fine, 2) == ("feature_extraction", 0)
    assert phase_mode(1, fine, 2) == ("feature_extraction", 0)
    assert phase_mode(2, fine, 2) == ("fine_tune", 2)
    assert phase_mode(0, fine, 0) == ("fine_tune", 2)
    assert phase_mode(0, ModelSettings(mode="feature_extraction"), 3) == ("feature_extraction", 0)


def test_which_parameters_get_gradients_in_each_phase() -> None:
    model, settings = _model(mode="fine_tune", unfreeze_last=1)
    # Warm-up: the head alone.
    apply_phase(model, settings, epoch=0, warmup_epochs=1)
    grads = _grads_after_step(model)
    assert {n for n, g in grads.items() if g} == {"head.weight", "head.bias"}
    # After the warm-up: the head and the last block (backbone.3 = the last Linear+ReLU).
    apply_phase(model, settings, epoch=1, warmup_epochs=1)
    grads = _grads_after_step(model)
    assert {n for n, g in grads.items() if g} == {
        "head.weight",
        "head.bias",
        "backbone.3.0.weight",
        "backbone.3.0.bias",
    }
    all_model, all_settings = _model(mode="all")
    apply_phase(all_model, all_settings, epoch=0, warmup_epochs=0)
    assert all(_grads_after_step(all_model).values())


def test_head_and_base_get_their_own_learning_rates() -> None:
    model, _ = _model()
    t = TrainingSettings(learning_rate=1e-4, head_learning_rate=1e-2)
    groups = {g["name"]: g for g in param_groups(model, t)}
    assert groups["base"]["lr"] == 1e-4 and groups["head"]["lr"] == 1e-2
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    assert not head_ids & {id(p) for p in groups["base"]["params"]}
    sgd = make_optimizer(model, t.model_copy(update={"optimizer": "sgd"}))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(make_optimizer(model, t), torch.optim.AdamW)


def test_a_frozen_parameter_is_not_moved_by_the_optimizer() -> None:
    model, settings = _model(mode="feature_extraction")
    apply_phase(model, settings, epoch=0, warmup_epochs=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainingSettings(weight_decay=0.1))
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (not n.startswith("head."))


def test_lr_schedules() -> None:
    t = TrainingSettings(lr_schedule="cosine")
    f = [lr_factor(s, training=t, steps_per_epoch=10, total_steps=30) for s in range(31)]
    assert f[0] == 1.0 and f[-1] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(f))
    assert f[15] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 2)))
    step = TrainingSettings(lr_schedule="step", lr_gamma=0.1, lr_step_epochs=2)
    assert [lr_factor(s, training=step, steps_per_epoch=10, total_steps=60) for s in (0, 19, 20, 40)] == pytest.approx(
        [1, 1, 0.1, 0.01]
    )
    const = TrainingSettings(lr_schedule="constant")
    assert lr_factor(99, training=const, steps_per_epoch=10, total_steps=30) == 1.0
