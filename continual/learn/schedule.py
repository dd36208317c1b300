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


def phase_mode(epoch: int, model: ModelSettings, warmup_epochs: int) -> tuple[str, int]:
    """``(mode, unfreeze_last)`` for an epoch (0-based): head only during the warm-up, then the configured mode."""
    if epoch < warmup_epochs and model.mode != "feature_extraction":
        return "feature_extraction", 0
    return model.mode, model.unfreeze_last


def apply_phase(model: nn.Module, settings: ModelSettings, epoch: int, warmup_epochs: int) -> tuple[str, int]:
    from continual.models import apply_mode

    mode, unfreeze = phase_mode(epoch, settings, warmup_epochs)
    apply_mode(model, mode, unfreeze)  # type: ignore[arg-type]
    return mode, unfreeze


def set_train_mode(model: nn.Module) -> None:
    """Train mode for the trainable parts only (see :func:`continual.models.set_train_mode`)."""
    from continual.models import set_train_mode as _set_train_mode

    _set_train_mode(model)  # type: ignore[arg-type]


def param_groups(model: nn.Module, training: TrainingSettings) -> list[dict[str, object]]:
    """Two groups: the base at ``learning_rate``, the head at ``head_learning_rate``.

    Every parameter is listed, frozen or not: a frozen one gets no gradient and
    the optimizer skips it, so unfreezing after the warm-up needs no new optimizer.
    """
    base, head = [], []
    for name, p in model.named_parameters():
        (head if name.startswith(HEAD_PREFIX) else base).append(p)
    groups: list[dict[str, object]] = []
    if base:
        groups.append({"params": base, "lr": training.learning_rate, "name": "base"})
    if head:
        groups.append({"params": head, "lr": training.head_learning_rate, "name": "head"})
    if not groups:
        raise ValueError("the model has no parameters to train")
    return groups


def make_optimizer(model: nn.Module, training: TrainingSettings) -> torch.optim.Optimizer:
    groups = param_groups(model, training)
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=0.9, weight_decay=training.weight_decay)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=training.learning_rate, weight_decay=training.weight_decay)
    raise ValueError(f"training.optimizer must be 'adamw' or 'sgd', got {training.optimizer!r}")


def lr_factor(step: int, *, training: TrainingSettings, steps_per_epoch: int, total_steps: int) -> float:
    """The multiplier of every group's base LR at an optimizer step (0-based)."""
    if training.lr_schedule == "constant":
        return 1.0
    if training.lr_schedule == "step":
        return training.lr_gamma ** ((step // max(1, steps_per_epoch)) // training.lr_step_epochs)
    if training.lr_schedule == "cosine":
        # Ends at 5% of the base LR rather than 0: the last steps still learn.
        progress = min(1.0, step / max(1, total_steps))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"training.lr_schedule must be cosine, step or constant, got {training.lr_schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, training: TrainingSettings, *, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, training=training, steps_per_epoch=steps_per_epoch, total_steps=total_steps)  # validates the name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, training=training, steps_per_epoch=steps_per_epoch, total_steps=total_steps),
    )
