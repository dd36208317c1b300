"""Elastic weight consolidation: the Fisher diagonal, its online combination, and the penalty.

Estimator: the **per-sample empirical Fisher** — for each training sample, the
squared gradient of ``log p(y_true | x)`` with respect to every trainable
parameter, averaged over samples (model in eval mode, no dropout, frozen batch-norm
statistics). It is *not* the batch-level estimate (square of a mini-batch mean
gradient), which is smaller by roughly the batch size: an ``ewc_lambda`` tuned
for one is not portable to the other.

Across versions the Fisher is combined online, ``F = decay * F_parent + F_run``,
and the penalty anchors the parameters at the parent's weights:
``lambda/2 * sum F * (theta - theta_parent)^2``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def trainable(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    return {prefix + n: p for n, p in model.named_parameters() if p.requires_grad}


def anchor_of(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the trainable parameters: the point the penalty pulls back to."""
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def ewc_penalty(model: nn.Module, anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
    """``1/2 * sum F * (theta - theta*)^2`` over the trainable parameters that have a Fisher and an anchor.

    Multiply by ``ewc_lambda``. Frozen parameters contribute nothing (they cannot
    move, and their gradient must stay None).
    """
    terms = [
        (fisher[n] * (p - anchor[n]).pow(2)).sum()
        for n, p in model.named_parameters()
        if p.requires_grad and n in fisher and n in anchor and fisher[n].shape == p.shape
    ]
    if not terms:
        p0 = next(model.parameters(), None)
        return torch.zeros((), device=p0.device if p0 is not None else None)
    return 0.5 * torch.stack(terms).sum()


class EwcTerm:
    """The penalty with its tensors moved to the model's device once, for the training loop."""

    def __init__(self, model: nn.Module, anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> None:
        self.params: list[Tensor] = []
        self.anchors: list[Tensor] = []
        self.fishers: list[Tensor] = []
        for n, p in model.named_parameters():
            if n in fisher and n in anchor and fisher[n].shape == p.shape:
                self.params.append(p)
                self.anchors.append(anchor[n].to(p.device, p.dtype))
                self.fishers.append(fisher[n].to(p.device, p.dtype))

    def __len__(self) -> int:
        return len(self.params)

    @torch.no_grad()
    def add_grad_(self, lam: float) -> None:
        """Add the penalty's gradient, ``lam * F * (theta - theta*)``, to the trainable parameters' ``.grad``.

        The same update as backpropagating ``lam * self()``, at a fraction of the cost:
        two multi-tensor operations instead of an autograd graph over every weight.
        """
        live = [i for i, p in enumerate(self.params) if p.requires_grad]
        if not live or lam == 0:
            return
        params = [self.params[i] for i in live]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        diff = torch._foreach_sub(params, [self.anchors[i] for i in live])
        torch._foreach_addcmul_([p.grad for p in params], diff, [self.fishers[i] for i in live], value=lam)

    def __call__(self) -> Tensor:
        terms = [
            (f * (p - a).pow(2)).sum()
            for p, a, f in zip(self.params, self.anchors, self.fishers, strict=True)
            if p.requires_grad
        ]
        if not terms:
            return torch.zeros((), device=self.params[0].device if self.params else None)
        return 0.5 * torch.stack(terms).sum()


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    max_samples: int,
    device: torch.device | str = "cpu",
    prefix: str = "",
    chunk_size: int = 16,
    should_stop: Callable[[], None] | None = None,
    vectorized: bool | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Per-sample empirical Fisher diagonal of the trainable parameters, on up to ``max_samples`` samples.

    Returns ``({prefix + name: F}, n_samples)``; ``F`` has each parameter's shape,
    float32 on the CPU. Per-sample gradients come from ``torch.func.vmap`` (one
    backward for a chunk of samples); models it cannot handle fall back to one
    backward per sample. ``vectorized``: True or False forces one way (tests).
    """
    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    seen = 0

    def log_lik(ps: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (ps, buffers), (x.unsqueeze(0),))
        # gather, not [0, y]: indexing with a vmapped label would call .item().
        return torch.log_softmax(out.float(), dim=-1).gather(1, y.reshape(1, 1)).sum()

    per_sample = vmap(grad(log_lik), in_dims=(None, 0, 0), chunk_size=chunk_size)
    use_vmap = vectorized is not False
    try:
        for x, y in batches:
            if should_stop is not None:
                should_stop()
            if seen >= max_samples:
                break
            x, y = x[: max_samples - seen].to(device), y[: max_samples - seen].to(device)
            if use_vmap:
                try:
                    grads = per_sample(params, x, y)
                except (RuntimeError, NotImplementedError):
                    if vectorized:
                        raise
                    use_vmap = False
            if not use_vmap:
                grads = _loop_grads(model, params, x, y)
            for n, g in grads.items():
                total[n] += g.float().pow(2).sum(0)
            seen += len(x)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("fisher_diagonal got no samples")
    return {prefix + n: (t / seen).cpu() for n, t in total.items()}, seen


def _loop_grads(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    live = {n: p for n, p in model.named_parameters() if n in params}
    out: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1]).float(), dim=-1)[0, y[i]]
        gs = torch.autograd.grad(logp, list(live.values()), allow_unused=True)
        for (n, p), g in zip(live.items(), gs, strict=True):
            out[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(v) for n, v in out.items()}


def combine_fisher(old: Mapping[str, Tensor] | None, new: Mapping[str, Tensor], decay: float) -> dict[str, Tensor]:
    """Online EWC: ``decay * F_old + F_new``, per parameter.

    A parameter without an old Fisher (newly trainable) or whose shape changed
    (a replaced head) takes the new estimate alone; one this run did not train
    keeps its decayed old value.
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"fisher_decay must be in [0, 1], got {decay}")
    out: dict[str, Tensor] = {}
    for n, f in new.items():
        prev = old.get(n) if old is not None else None
        out[n] = (decay * prev.to(f.dtype) + f) if prev is not None and prev.shape == f.shape else f.clone()
    # Parameters frozen in this run keep their (decayed) importance for a later run that unfreezes them.
    for n, f in (old or {}).items():
        if n not in out:
            out[n] = decay * f
    return out
