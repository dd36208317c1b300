"""DANN, AdaBN and progressive unfreezing (continual/learn/adapt.py, the loop, the schedule)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
import torch
from torch import Tensor, nn

from continual.config import ModelSettings, Settings, settings_from_dict
from continual.learn.adapt import adabn, domain_classifier, grad_reverse, grl_lambda
from continual.learn.schedule import apply_phase, phase_mode, warmup_factor
from continual.learn.train import train
from continual.models import Classifier, build_model


def test_grl_is_identity_forward_and_flips_the_gradient_times_lambda() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    w = torch.randn(5, 3)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)  # type: ignore[arg-type]
    x.grad = None
    grad_reverse(x, 0.0).sum().backward()
    assert torch.count_nonzero(x.grad) == 0  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam"):
        grad_reverse(x, -1.0)


def test_lambda_ramps_from_zero_to_the_weight() -> None:
    assert grl_lambda(0.0, 2.0) == 0.0
    assert grl_lambda(0.5, 1.0) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_lambda(1.0, 2.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-10)) - 1))
    assert grl_lambda(3.0, 1.0) == grl_lambda(1.0, 1.0)  # progress is clipped
    values = [grl_lambda(p / 20, 1.0) for p in range(21)]
    assert values == sorted(values) and values[-1] < 1.0
    with pytest.raises(ValueError, match="weight"):
        grl_lambda(0.5, -0.1)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))


def test_adabn_changes_only_batchnorm_buffers() -> None:
    net = _bn_net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    target = [torch.randn(16, 3, 8, 8) * 3 + 2 for _ in range(4)]
    info = adabn(net, target, torch.device("cpu"))
    assert info == {"applied": True, "layers": 1, "samples": 64}
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert not net.training  # left as it was
    # The statistics are the target's: the conv output's per-channel mean over all batches.
    with torch.no_grad():
        conv = net[0](torch.cat(target))
    assert torch.allclose(after["1.running_mean"], conv.mean(dim=(0, 2, 3)), atol=1e-4)
    assert net[1].momentum == 0.1  # restored


def test_adabn_does_not_apply_without_batchnorm() -> None:
    mlp = build_model(_mlp_settings())
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    info = adabn(mlp.backbone, [torch.randn(8, 6)], torch.device("cpu"))
    assert info["applied"] is False and "no BatchNorm" in info["reason"]
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def _mlp_settings(**kw: object) -> ModelSettings:
    return ModelSettings(
        architecture="mlp", weights="none", mode="all", hidden=(16, 8, 8), input={"kind": "vector", "shape": [6]}
    ).model_copy(update=kw)


def _trainable(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}


def test_progressive_unfreezing_goes_from_the_top_block_down() -> None:
    settings = _mlp_settings(mode="fine_tune", unfreeze_last=2)
    model = build_model(settings)
    seen = []
    for epoch in range(4):
        apply_phase(model, settings, epoch, 0, schedule="progressive")
        seen.append(_trainable(model))
    # The mlp's blocks are backbone.1, .2, .3 (Linear+ReLU each); the top one first.
    assert seen == [
        {"head"},
        {"head", "backbone.3.0"},
        {"head", "backbone.3.0", "backbone.2.0"},
        {"head", "backbone.3.0", "backbone.2.0"},  # unfreeze_last = 2 is the limit
    ]
    everything = _mlp_settings(mode="all")
    assert [phase_mode(e, everything, 0, schedule="progressive", n_blocks=3) for e in range(5)] == [
        ("feature_extraction", 0),
        ("fine_tune", 1),
        ("fine_tune", 2),
        ("all", 0),
        ("all", 0),
    ]
    assert phase_mode(5, _mlp_settings(mode="feature_extraction"), 0, schedule="progressive") == (
        "feature_extraction",
        0,
    )
    with pytest.raises(ValueError, match="unfreeze_schedule"):
        phase_mode(0, settings, 0, schedule="sideways")
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def _settings(**training: object) -> Settings:
    return settings_from_dict(
        {
            "model": {
                "architecture": "mlp",
                "weights": "none",
                "mode": "all",
                "hidden": [16],
                "classes": ["a", "b"],
                "input": {"kind": "vector", "shape": [10]},
            },
            # SGD, as in the DANN paper: Adam's per-weight step sizes blunt the reversed gradient here.
            "training": {
                "epochs": 40,
                "optimizer": "sgd",
                "learning_rate": 0.05,
                "head_learning_rate": 0.05,
                "batch_size": 32,
                **training,
            },
            "adaptation": {"grl_weight": 3.0, "domain_weight": 1.0, "domain_hidden": 32},
        }
    )


def _domains(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(n, 10, generator=g)
    y = (source[:, 0] > 0).long()
    # The target domain differs in dimensions that carry no label.
    target = torch.randn(n, 10, generator=g)
    target[:, 5:] += 2.0
    return source, y, target


def _batches(x: Tensor, y: Tensor, bs: int, seed: int) -> Iterable[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + bs]], y[order[i : i + bs]]) for i in range(0, len(x), bs)]


def _domain_accuracy(model: Classifier, source: Tensor, target: Tensor) -> float:
    """A fresh logistic regression told source from target embeddings: its accuracy on held-out ones."""
    with torch.no_grad():
        es, et = model.embed(source), model.embed(target)
    x, d = torch.cat([es, et]), torch.cat([torch.zeros(len(es)), torch.ones(len(et))])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(5))
    x, d = x[order], d[order]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    half = len(x) // 2
    torch.manual_seed(0)
    probe = nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(probe(x[:half]).squeeze(1), d[:half]).backward()
        opt.step()
    with torch.no_grad():
        return float(((probe(x[half:]).squeeze(1) > 0).float() == d[half:]).float().mean())


def _fit(adapt: bool) -> tuple[float, float]:
    settings = _settings()
    source, y, target = _domains(512, seed=1)
    torch.manual_seed(0)
    model = build_model(settings.model)
    domain_net = domain_classifier(model.embedding_dim, 32) if adapt else None
    train(
        model,
        settings,
        lambda epoch: _batches(source, y, 32, epoch),
        steps_per_epoch=16,
        device=torch.device("cpu"),
        domain_net=domain_net,
        target_batches=(lambda epoch: [b for b, _ in _batches(target, y, 32, 100 + epoch)]) if adapt else None,
    )
    held_source, held_y, held_target = _domains(400, seed=2)
    with torch.no_grad():
        task = float((model(held_source).argmax(1) == held_y).float().mean())
    return _domain_accuracy(model, held_source, held_target), task


def test_dann_makes_the_domains_harder_to_tell_apart_on_held_out_embeddings() -> None:
    plain_domain, plain_task = _fit(adapt=False)
    dann_domain, dann_task = _fit(adapt=True)
    assert plain_domain > 0.9  # the shift is plain to see in an unadapted embedding
    assert dann_domain < plain_domain - 0.1, (plain_domain, dann_domain)
    assert dann_task > 0.9 and plain_task > 0.9  # the task is still learned


def test_dann_refuses_cached_features() -> None:
    settings = _settings()
    model = build_model(settings.model)
    with pytest.raises(ValueError, match="cached features"):
        train(
            model,
            settings,
            lambda epoch: [],
            steps_per_epoch=1,
            device=torch.device("cpu"),
            net=model.head,
            domain_net=domain_classifier(model.embedding_dim, 4),
            target_batches=lambda epoch: [],
        )


def test_domain_augmentation_changes_training_images_only() -> None:
    from continual.config import InputSettings
    from continual.demo.digits import digit_images, png
    from continual.models import make_transform
    from continual.models.transforms import transform_stored

    class Row:
        seq, external_id, kind = 1, "a", "image"
        payload = png(digit_images()[0][0])

    spec = InputSettings(kind="image", size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    domain = spec.model_copy(update={"augment_domain": ("color_jitter", "blur", "noise")})
    plain = transform_stored(Row(), make_transform(spec, train=True))
    torch.manual_seed(0)
    augmented = [transform_stored(Row(), make_transform(domain, train=True)) for _ in range(3)]
    assert all(a.shape == plain.shape and not torch.equal(a, plain) for a in augmented)
    assert torch.equal(transform_stored(Row(), make_transform(domain, train=False)), plain)
    with pytest.raises(ValueError):
        InputSettings(augment_domain=("rotate",))  # type: ignore[arg-type]


def test_the_loop_unfreezes_progressively_and_records_each_epoch() -> None:
    settings = settings_from_dict(
        {
            "model": {
                "architecture": "mlp", "weights": "none", "mode": "fine_tune", "unfreeze_last": 2,
                "hidden": [16, 8, 8], "classes": ["a", "b"], "input": {"kind": "vector", "shape": [10]},
            },
            "training": {"epochs": 4, "unfreeze_schedule": "progressive", "batch_size": 32},
            "adaptation": {"warmup_steps": 3},
        }
    )  # fmt: skip
    source, y, _ = _domains(128, seed=3)
    torch.manual_seed(0)
    model = build_model(settings.model)
    first_block = model.backbone[1][0].weight.detach().clone()
    result = train(
        model, settings, lambda epoch: _batches(source, y, 32, epoch), steps_per_epoch=4, device=torch.device("cpu")
    )
    assert [h["unfrozen_blocks"] for h in result.history] == [0, 1, 2, 2]
    assert [h["mode"] for h in result.history] == ["feature_extraction", "fine_tune", "fine_tune", "fine_tune"]
    assert torch.equal(model.backbone[1][0].weight, first_block)  # below unfreeze_last: never trained
