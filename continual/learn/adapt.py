"""Learning from unlabeled traffic: the gradient reversal layer, its schedule, the domain classifier, AdaBN.

DANN (Ganin & Lempitsky, 2015): a small classifier learns to tell source embeddings
(the labeled batch) from target ones (logged, unlabeled inputs) while the gradient
reversal layer hands the backbone the *negated* gradient of that loss, so the
backbone learns embeddings the domain classifier cannot tell apart. The loop
(``continual.learn.train``) adds the term; these are plain functions and modules.

AdaBN (Li et al., 2016): BatchNorm's running statistics describe the training
domain; recomputing them on target inputs re-centres the features for the new
domain without any label. A backbone without BatchNorm has nothing to recompute.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:  # Any: autograd's context object
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # Any: autograd's context object
        return grad.neg() * ctx.lam, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """Identity forward; the gradient times ``-lam`` backward."""
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return _GradReverse.apply(x, float(lam))  # type: ignore[no-any-return]


def grl_lambda(progress: float, weight: float) -> float:
    """``weight * (2 / (1 + exp(-10 p)) - 1)``: 0 at the start, ~``weight`` at the end (p clipped to [0, 1]).

    The domain classifier is random at first; its reversed gradient would only add
    noise to the backbone, so the reversal fades in as training goes on.
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    p = min(1.0, max(0.0, progress))
    return weight * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def domain_classifier(embedding_dim: int, hidden: int) -> nn.Module:
    """Embedding -> one logit (target vs source)."""
    if embedding_dim < 1 or hidden < 1:
        raise ValueError(f"embedding_dim and hidden must be >= 1, got {embedding_dim}, {hidden}")
    return nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def domain_loss(domain_net: nn.Module, source: Tensor, target: Tensor, lam: float) -> Tensor:
    """Binary cross-entropy of ``domain_net`` telling ``source`` (0) from ``target`` (1) embeddings, behind the GRL."""
    emb = grad_reverse(torch.cat([source, target]).float(), lam)
    y = torch.cat([torch.zeros(len(source), device=emb.device), torch.ones(len(target), device=emb.device)])
    return F.binary_cross_entropy_with_logits(domain_net(emb).squeeze(1), y)


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def adabn(backbone: nn.Module, batches: Iterable[Tensor], device: torch.device) -> dict[str, Any]:
    """Recompute every BatchNorm layer's running mean and variance on ``batches`` (target inputs).

    Only the BatchNorm buffers change: the statistics are reset and re-estimated as
    a cumulative average over all target batches (momentum ``None``), with every
    other layer in eval mode. Returns what was done, or why nothing was (no
    BatchNorm, no target inputs), for the run's record.
    """
    layers = batchnorm_layers(backbone)
    if not layers:
        return {"applied": False, "reason": "the backbone has no BatchNorm layers: AdaBN does not apply"}
    was_training = backbone.training
    momenta = [m.momentum for m in layers]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]  # type: ignore[union-attr]
    backbone.eval()
    for m in layers:
        m.reset_running_stats()  # type: ignore[operator]
        m.momentum = None  # a cumulative average over every target batch, not the last few
        m.train()
    n = 0
    for x in batches:
        if len(x) < 2:
            continue  # BatchNorm in train mode needs two values per channel
        backbone(x.to(device))
        n += len(x)
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    if n == 0:
        for m, (mean, var, count) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)  # type: ignore[union-attr,operator]
            m.running_var.copy_(var)  # type: ignore[union-attr,operator]
            m.num_batches_tracked.copy_(count)  # type: ignore[union-attr,operator]
        backbone.train(was_training)
        return {"applied": False, "reason": "no target inputs of at least two samples per batch"}
    backbone.train(was_training)
    return {"applied": True, "layers": len(layers), "samples": n}
