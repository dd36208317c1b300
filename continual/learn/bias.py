"""Bias correction for the new classes' logits (BiC: Wu et al., "Large Scale Incremental Learning", 2019).

After a run that added classes, the head has seen many samples of the new
classes and only a replayed share of each old one, so the new classes' logits
come out systematically too large: old-class samples near the boundary are
called new. BiC fixes this with two numbers: the new classes' logits become
``alpha * z + beta`` (old logits untouched), with ``(alpha, beta)`` fitted by
cross-entropy on a small class-balanced validation slice that training never
saw, everything else frozen. Two parameters cannot overfit a small slice the
way re-training the head would, and the fit runs on logits computed once (no
backward through the network).

The correction is linear in the head's new rows, so it is folded into them
(:func:`fold_bias_correction`) and serving needs no extra step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def new_class_mask(n_old: int, n_classes: int) -> Tensor:
    """A bool mask ``[n_classes]``, True for the classes a grown head appended after the first ``n_old``.

    >>> new_class_mask(2, 4).tolist()
    [False, False, True, True]
    """
    if not 0 <= n_old <= n_classes:
        raise ValueError(f"n_old must be in [0, n_classes={n_classes}], got {n_old}")
    mask = torch.zeros(n_classes, dtype=torch.bool)
    mask[n_old:] = True
    return mask


def fit_bias_correction(
    logits: Tensor,
    labels: Tensor,
    new_mask: Tensor,
    *,
    balanced: bool = True,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> tuple[float, float]:
    """``(alpha, beta)`` minimising the cross-entropy of the corrected logits on a validation slice.

    ``logits [N, C]`` are the frozen model's outputs on the slice, ``labels [N]``
    class indices, ``new_mask [C]`` marks the new classes. ``balanced``: each
    class weighs the same in the loss, whatever its number of samples (the
    correction must not learn the slice's class frequencies). ``alpha`` is
    fitted as ``exp(s)`` so it stays positive (a negative scale would reverse
    the ranking among the new classes), and ``l2 * (s² + beta²)`` keeps the
    optimum finite when the slice is separable (otherwise the loss keeps
    falling as ``alpha`` grows). L-BFGS in float64 from ``(1, 0)``: deterministic.

    >>> z = torch.tensor([[2.0, 0.0, 3.0], [0.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    >>> alpha, beta = fit_bias_correction(z, torch.tensor([0, 1, 2]), new_class_mask(2, 3))
    >>> bool(apply_bias_correction(z, new_class_mask(2, 3), alpha, beta).argmax(1).tolist() == [0, 1, 2])
    True
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, classes], got shape {list(logits.shape)}")
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {list(labels.shape)}")
    mask = _check_mask(new_mask, c)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    y = labels.detach().long().cpu()
    if n == 0 or int(y.min()) < 0 or int(y.max()) >= c:
        raise ValueError(f"labels must be class indices in [0, {c}) and not empty")
    is_new = mask[y]
    if not bool(is_new.any()) or bool(is_new.all()):
        raise ValueError(
            f"the validation slice needs samples of both old and new classes, got {int(is_new.sum())} new of {n}"
        )
    z = logits.detach().cpu().to(torch.float64)
    weight = None
    if balanced:
        counts = torch.bincount(y, minlength=c).to(torch.float64)
        weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    s = torch.zeros((), dtype=torch.float64, requires_grad=True)
    beta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [s, beta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12
    )

    def closure() -> Tensor:
        opt.zero_grad()
        q = torch.where(mask, torch.exp(s) * z + beta, z)
        loss = F.cross_entropy(q, y, weight=weight) + l2 * (s.pow(2) + beta.pow(2))
        loss.backward()
        return loss

    opt.step(closure)
    return float(torch.exp(s.detach())), float(beta.detach())


def apply_bias_correction(logits: Tensor, new_mask: Tensor, alpha: float, beta: float) -> Tensor:
    """``alpha * z + beta`` on the new classes' logits; the old classes' logits are returned unchanged.

    >>> apply_bias_correction(torch.tensor([[1.0, 2.0]]), new_class_mask(1, 2), 0.5, -1.0).tolist()
    [[1.0, 0.0]]
    """
    mask = _check_mask(new_mask, logits.shape[-1]).to(logits.device)
    return torch.where(mask, alpha * logits + beta, logits)


def fold_bias_correction(head: nn.Linear, new_mask: Tensor, alpha: float, beta: float) -> nn.Linear:
    """A copy of ``head`` with the correction folded into the new rows: ``W ← alpha·W``, ``b ← alpha·b + beta``.

    ``fold(head)(e)`` equals ``apply_bias_correction(head(e), ...)`` up to float
    rounding; old rows are copied bit for bit. A head without a bias gains one
    (zero on the old rows) when ``beta`` is not 0.
    """
    mask = _check_mask(new_mask, head.out_features).to(head.weight.device)
    w = head.weight.detach()
    has_bias = head.bias is not None or beta != 0
    out = nn.Linear(head.in_features, head.out_features, bias=has_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.where(mask[:, None], alpha * w, w))
        if out.bias is not None:
            b = head.bias.detach() if head.bias is not None else torch.zeros_like(out.bias)
            out.bias.copy_(torch.where(mask, alpha * b + beta, b))
    out.train(head.training)
    out.requires_grad_(head.weight.requires_grad)
    return out


def _check_mask(new_mask: Tensor, n_classes: int) -> Tensor:
    if new_mask.dtype != torch.bool or new_mask.shape != (n_classes,):
        raise ValueError(
            f"new_mask must be a bool tensor of shape [{n_classes}], got {new_mask.dtype} {list(new_mask.shape)}"
        )
    if not bool(new_mask.any()) or bool(new_mask.all()):
        raise ValueError(f"new_mask must mark some but not all of the {n_classes} classes as new")
    return new_mask.cpu()
