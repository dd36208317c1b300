"""Accuracy of a model on stored samples (the gate's old and new holdouts)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from continual.config import Settings
from continual.learn.data import decode_row, load_transform
from continual.store import Store


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    predictions: np.ndarray  # class index per sample, in the order of the seqs given
    labels: np.ndarray  # true class index; -1 for a label the model does not know (always wrong)
    seqs: np.ndarray | None = None
    classes: tuple[str, ...] = ()  # the model's classes: what a prediction index names
    label_names: np.ndarray | None = None  # the stored label of each sample (object array)

    @property
    def predicted_names(self) -> np.ndarray:
        """The predicted class of each sample by name (object array): comparable across models."""
        return np.asarray(self.classes, dtype=object)[self.predictions] if len(self.predictions) else np.array([])


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    store: Store,
    seqs: Sequence[int] | np.ndarray,
    settings: Settings,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 256,
) -> EvalResult:
    """Predict every sample in ``seqs`` (batched, inference mode) and compare with its stored label."""
    device = torch.device(device) if isinstance(device, str) else device
    classes = getattr(model, "classes", None) or settings.model.classes
    class_index = {c: i for i, c in enumerate(classes)}
    transform = load_transform(settings.model.input, train=False, max_pixels=settings.ingest.max_image_pixels)
    was_training = model.training
    model.eval()
    order = np.asarray([int(s) for s in seqs], dtype=np.int64)
    preds: dict[int, int] = {}
    labels: dict[int, int] = {}
    names: dict[int, str] = {}
    try:
        for rows in store.iter_samples(seqs=order.tolist(), batch_size=batch_size):
            x = torch.stack([decode_row(r, transform) for r in rows]).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
                out = model(x)
            for r, p in zip(rows, out.argmax(dim=-1).cpu().tolist(), strict=True):
                preds[r.seq] = int(p)
                labels[r.seq] = class_index.get(r.label, -1)
                names[r.seq] = r.label
    finally:
        model.train(was_training)
    kept = np.asarray([s for s in order if s in preds], dtype=np.int64)  # seqs no longer stored are skipped
    p = np.asarray([preds[s] for s in kept], dtype=np.int64)
    y = np.asarray([labels[s] for s in kept], dtype=np.int64)
    acc = float((p == y).mean()) if len(kept) else 0.0
    label_names = np.asarray([names[s] for s in kept], dtype=object)
    return EvalResult(
        accuracy=acc, n=len(kept), predictions=p, labels=y, seqs=kept, classes=tuple(classes), label_names=label_names
    )
