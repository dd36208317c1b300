"""Unlabeled target data for adaptation: logged inputs from the prediction log, fixed at a run's start.

``[adaptation] target = "drift_window"`` takes the inputs logged up to the last
drift check that flagged drift (the traffic its current window described), newest
first; with no such check, or ``target = "latest"``, the newest logged inputs.
Either way class-blind, one per input hash, and never the input of a holdout
sample (``store.predictions.logged_inputs``). Inputs are decoded lazily, a batch
at a time, so a thousand images do not sit in memory as tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from continual.config import Settings
from continual.learn.adapt import adabn, domain_classifier
from continual.learn.data import decode_row, load_transform
from continual.models import Classifier
from continual.store import LoggedInput, Store

log = logging.getLogger("continual.learn.target")


@dataclass(frozen=True)
class TargetData:
    inputs: Sequence[LoggedInput]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inputs)


def plan_target(store: Store, settings: Settings) -> TargetData:
    """The run's target inputs and where they came from (recorded in the run's metrics and manifest)."""
    a = settings.adaptation
    kind = settings.model.input.kind
    info: dict[str, Any] = {"source": "latest"}
    before = None
    if a.target == "drift_window":
        check = store.records.last_drift_check()
        if check is not None and check["detected"]:
            before = check["created_at"]
            info = {"source": "drift_window", "drift_check_id": int(check["id"]), "until": str(before)}
        else:
            info["fallback"] = "no drift check has flagged drift: the newest logged inputs"
    inputs, repeats = store.predictions.logged_inputs(limit=a.target_samples, before=before, kind=kind)
    info.update(n=len(inputs), duplicates_skipped=repeats, requested=a.target_samples)
    if inputs:
        info["first_prediction"], info["last_prediction"] = inputs[-1].id, inputs[0].id
    return TargetData(inputs, info)


def target_batches(
    target: TargetData, settings: Settings, *, batch_size: int, seed: int, epoch: int = 0
) -> Iterator[torch.Tensor]:
    """Decoded target inputs in shuffled batches of ``batch_size`` (the last may be smaller), a new order per epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = load_transform(settings.model.input, train=False, max_pixels=settings.ingest.max_image_pixels)
    order = np.random.default_rng([seed, 13, epoch]).permutation(len(target.inputs))
    for start in range(0, len(order), batch_size):
        rows = [target.inputs[int(i)] for i in order[start : start + batch_size]]
        yield torch.stack([decode_row(r, transform) for r in rows])


@dataclass
class Adaptation:
    """What a run adapts with: its record, and for DANN the domain classifier and the target batches."""

    info: dict[str, Any]
    domain_net: nn.Module | None = None
    batches: Callable[[int], Iterable[torch.Tensor]] | None = None


def prepare_adaptation(
    store: Store, settings: Settings, model: Classifier, device: torch.device, *, seed: int, distributed: bool
) -> Adaptation:
    """Fix the target data and set up ``[training] adaptation``; AdaBN is applied here, before any training step.

    AdaBN runs first so that everything after it, the frozen-base feature cache
    included, sees the target statistics. A method that cannot apply (too few
    logged inputs, no BatchNorm, a frozen backbone for DANN) is skipped and the
    reason recorded: the run still trains, and the gate still judges it.
    """
    t, a = settings.training, settings.adaptation
    info: dict[str, Any] = {"method": t.adaptation}
    if t.adaptation == "none":
        return Adaptation(info)
    if t.adaptation == "dann" and distributed:
        raise ValueError('[training] adaptation = "dann" needs launcher = "local" (one process)')
    target = plan_target(store, settings)
    info["target"] = target.info

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        return target_batches(target, settings, batch_size=t.batch_size, seed=seed, epoch=epoch)

    why = ""
    if len(target) < a.min_target_samples:
        why = f"{len(target)} logged inputs < [adaptation] min_target_samples = {a.min_target_samples}"
    elif t.adaptation == "adabn":
        info["adabn"] = adabn(model.backbone, batches(0), device)
        why = "" if info["adabn"]["applied"] else str(info["adabn"]["reason"])
    elif settings.model.mode == "feature_extraction":
        why = 'DANN trains the backbone, and [model] mode = "feature_extraction" keeps it frozen'
    if why:
        info["skipped"] = why
        log.info("adaptation %s skipped: %s", t.adaptation, why)
        return Adaptation(info)
    if t.adaptation == "adabn":
        return Adaptation(info)
    net = domain_classifier(model.embedding_dim, a.domain_hidden)
    info.update(grl_weight=a.grl_weight, domain_weight=a.domain_weight)
    return Adaptation(info, net, batches)
