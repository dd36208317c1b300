"""The transfer-learning schedule: which parameters train when, at which learning rate.

The head gets its own, higher learning rate; the pretrained base a low one. With
``warmup_epochs`` the first epochs train the head alone (base frozen), because a
freshly initialised head sends large, noisy gradients into the base and wrecks
the pretrained features; afterwards ``model.mode`` / ``unfreeze_last`` apply.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from continual.config import ModelSettings, TrainingSettings

HEAD_PREFIX = "head."


def phase_mode(
    epoch: int, model: ModelSettings, warmup_epochs: int, *, schedule: str = "fixed", n_blocks: int = 0
) -> tuple[str, int]:
    """``(mode, unfreeze_last)`` for an epoch (0-based).

    ``schedule = "fixed"``: head only during the warm-up, then the configured mode.
    ``"progressive"``: epoch 0 trains the head; each later epoch unfreezes one more
    block from the top, up to ``unfreeze_last`` (``mode = "fine_tune"``) or every
    block (``mode = "all"``, which ends with the whole model) — the top blocks are
    the most task-specific, so they move first, and the lower, more general ones
    only once the layers above them have settled.
    """
    if schedule == "progressive":
        if model.mode == "feature_extraction":
            return "feature_extraction", 0
        limit = model.unfreeze_last if model.mode == "fine_tune" else n_blocks
        n = min(epoch, limit)
        if model.mode == "all" and n >= n_blocks:
            return "all", 0
        return ("fine_tune", n) if n else ("feature_extraction", 0)
    if schedule != "fixed":
        raise ValueError(f"unfreeze_schedule must be 'fixed' or 'progressive', got {schedule!r}")
    if epoch < warmup_epochs and model.mode != "feature_extraction":
        return "feature_extraction", 0
    return model.mode, model.unfreeze_last


def apply_phase(
    model: nn.Module, settings: ModelSettings, epoch: int, warmup_epochs: int, *, schedule: str = "fixed"
) -> tuple[str, int]:
    from continual.models import apply_mode

    blocks = getattr(model, "blocks", None)
    n_blocks = len(blocks()) if callable(blocks) else 0
    mode, unfreeze = phase_mode(epoch, settings, warmup_epochs, schedule=schedule, n_blocks=n_blocks)
    apply_mode(model, mode, unfreeze)  # type: ignore[arg-type]
    return mode, unfreeze


def warmup_factor(steps_since_unfreeze: int, warmup_steps: int) -> float:
    """The LR multiplier of a freshly unfrozen base: linear from 1/warmup_steps to 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (steps_since_unfreeze + 1) / warmup_steps)


def set_train_mode(model: nn.Module) -> None:
    """Train mode for the trainable parts only (see :func:`continual.models.set_train_mode`)."""
    from continual.models import set_train_mode as _set_train_mode

    _set_train_mode(model)  # type: ignore[arg-type]


def param_groups(model: nn.Module, training: TrainingSettings) -> list[dict[str, object]]:
    """Two groups: the base at ``learning_rate``, the head at ``head_learning_rate``.

    Every parameter is listed, frozen or not: a frozen one gets no gradient and
    the optimizer skips it, so unfreezing after the warm-up needs no new optimizer.
    With ``decay_norm_and_bias = false`` (the text default) each splits in two:
    biases and normalisation weights (every parameter with fewer than two
    dimensions) go to a ``*_no_decay`` group with ``weight_decay = 0`` -- decaying
    LayerNorm's gain towards 0 only fights the pretrained scale.
    """
    buckets: dict[str, list[nn.Parameter]] = {"base": [], "base_no_decay": [], "head": [], "head_no_decay": []}
    for name, p in model.named_parameters():
        group = "head" if name.startswith(HEAD_PREFIX) else "base"
        if not training.decay_norm_and_bias and is_no_decay(name, p):
            group += "_no_decay"
        buckets[group].append(p)
    groups: list[dict[str, object]] = []
    for name, params in buckets.items():
        if not params:
            continue
        lr = training.head_learning_rate if name.startswith("head") else training.learning_rate
        group: dict[str, object] = {"params": params, "lr": lr, "name": name}
        if name.endswith("_no_decay"):
            group["weight_decay"] = 0.0
        groups.append(group)
    if not groups:
        raise ValueError("the model has no parameters to train")
    return groups


def is_no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and normalisation weights (LayerNorm, BatchNorm): vectors, not matrices."""
    return p.ndim < 2 or name.endswith(".bias") or "layernorm" in name.lower()


def make_optimizer(model: nn.Module, training: TrainingSettings) -> torch.optim.Optimizer:
    groups = param_groups(model, training)
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=0.9, weight_decay=training.weight_decay)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=training.learning_rate, weight_decay=training.weight_decay)
    raise ValueError(f"training.optimizer must be 'adamw' or 'sgd', got {training.optimizer!r}")


def lr_factor(step: int, *, training: TrainingSettings, steps_per_epoch: int, total_steps: int) -> float:
    """The multiplier of every group's base LR at an optimizer step (0-based).

    With ``lr_warmup_fraction`` the first ``ceil(fraction * total_steps)`` steps ramp
    linearly up to the schedule (step ``i`` at ``(i + 1) / warmup``): Adam's first
    updates, with its moment estimates still noisy, would otherwise move the
    pretrained weights at the full LR.
    """
    warmup = math.ceil(training.lr_warmup_fraction * total_steps)
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if training.lr_schedule == "constant":
        return ramp
    if training.lr_schedule == "step":
        return ramp * training.lr_gamma ** ((step // max(1, steps_per_epoch)) // training.lr_step_epochs)
    if training.lr_schedule == "cosine":
        # Ends at 5% of the base LR rather than 0: the last steps still learn.
        progress = min(1.0, step / max(1, total_steps))
        return ramp * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"training.lr_schedule must be cosine, step or constant, got {training.lr_schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, training: TrainingSettings, *, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, training=training, steps_per_epoch=steps_per_epoch, total_steps=total_steps)  # validates the name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, training=training, steps_per_epoch=steps_per_epoch, total_steps=total_steps),
    )
