"""The classifier every part of the service trains and serves: a backbone, then one linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MODES = ("feature_extraction", "fine_tune", "all")


class Classifier(nn.Module):
    """``forward(x) = head(backbone(x))``.

    ``backbone`` maps an input batch to embeddings ``[N, embedding_dim]`` (the drift
    monitor and the feature cache use them); ``head`` is ``nn.Linear(embedding_dim,
    len(classes))``. ``blocks()`` lists the backbone's stages in input-to-output
    order so fine-tuning can unfreeze the last N.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        classes: Sequence[str],
        *,
        architecture: str,
        blocks: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        if head.out_features != len(classes):
            raise ValueError(f"head has {head.out_features} outputs but there are {len(classes)} classes")
        self.backbone = backbone
        self.head = head
        self.classes: tuple[str, ...] = tuple(classes)
        self.embedding_dim: int = head.in_features
        self.architecture = architecture
        # A plain list, not a ModuleList: the blocks are already registered under
        # ``backbone`` and must not appear twice in the state dict.
        self._blocks = list(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)


def apply_mode(model: Classifier, mode: str, unfreeze_last: int = 0) -> None:
    """Set ``requires_grad`` for a training mode.

    ``feature_extraction``: only the head trains. ``fine_tune``: the head and the
    last ``unfreeze_last`` blocks. ``all``: everything.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if unfreeze_last < 0:
        raise ValueError(f"unfreeze_last must be >= 0, got {unfreeze_last}")
    blocks = model.blocks()
    if mode == "fine_tune" and unfreeze_last > len(blocks):
        raise ValueError(
            f"unfreeze_last = {unfreeze_last} but {model.architecture} has only {len(blocks)} blocks to unfreeze"
        )
    for p in model.backbone.parameters():
        p.requires_grad_(mode == "all")
    if mode == "fine_tune" and unfreeze_last:
        for block in blocks[-unfreeze_last:]:
            for p in block.parameters():
                p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)


def set_train_mode(model: Classifier) -> None:
    """Put only the trainable parts in train mode; frozen parts stay in eval mode.

    A frozen block's BatchNorm must keep its pretrained running statistics (train
    mode would overwrite them with the statistics of a few small batches) and its
    dropout must stay off, so frozen-base outputs are deterministic and can be cached.
    """
    backbone_params = list(model.backbone.parameters())
    if backbone_params and all(p.requires_grad for p in backbone_params):
        model.train()
        return
    model.eval()
    for block in model.blocks():
        block.train(any(p.requires_grad for p in block.parameters()))
    model.head.train()


def trainable_parameters(model: Classifier) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters that require grad — for two learning rates."""
    base = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    return base, head
