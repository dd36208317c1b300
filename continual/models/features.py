"""Frozen-base features, computed once per sample and cached.

In ``feature_extraction`` mode the base never changes during a run, so its output
for a sample is a pure function of (base weights, payload): the cache key is the
pair (hash of the backbone's weights, payload sha256). Every epoch after the first
then costs only the head. The drift monitor embeds samples through the same
function and cache. Callers read the rows (``continual.store``); this module only
computes and caches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from continual.config import InputSettings
from continual.models.transforms import make_transform, transform_stored


class EmbeddableRow(Protocol):
    """A stored sample with its payload hash (``continual.store.SampleRow`` is one)."""

    seq: int
    external_id: str
    kind: str
    payload: bytes
    sha256: str


def backbone_hash(model: nn.Module) -> str:
    """sha256 over the backbone's state (names, shapes, dtypes and bytes): the cache's namespace."""
    backbone = getattr(model, "backbone", model)
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


class FeatureCache:
    """Embeddings of one backbone, keyed by payload sha256, least recently used first out.

    ``path`` (optional) is a directory; :meth:`save` writes ``<path>/<backbone_hash>.npz``
    atomically and a new cache for the same backbone starts from it.
    """

    def __init__(self, backbone_id: str, max_items: int, path: Path | None = None) -> None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        self.backbone_id, self.max_items, self.path = backbone_id, max_items, path
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0
        if path is not None and self.file.is_file():
            self._load()

    @property
    def file(self) -> Path:
        if self.path is None:
            raise ValueError("this FeatureCache has no path")
        return self.path / f"{self.backbone_id}.npz"

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> np.ndarray | None:
        v = self._items.get(key)
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return v

    def put(self, key: str, value: np.ndarray) -> None:
        if self.max_items == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def save(self) -> None:
        if self.path is None or not self._items:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{self.backbone_id}.{os.getpid()}.npz"
        keys = list(self._items)
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.asarray(json.dumps(keys)), values=np.stack([self._items[k] for k in keys]))
        os.replace(tmp, self.file)

    def _load(self) -> None:
        try:
            with np.load(self.file, allow_pickle=False) as data:
                keys = json.loads(str(data["keys"]))
                values = data["values"]
        except (OSError, ValueError, KeyError):
            return  # an unreadable cache is only a slower start
        for k, v in zip(keys[-self.max_items :] if self.max_items else [], values[-self.max_items :], strict=False):
            self._items[k] = np.asarray(v, dtype=np.float32)


@torch.inference_mode()
def embed_rows(
    model: nn.Module,
    rows: Sequence[EmbeddableRow],
    *,
    spec: InputSettings,
    cache: FeatureCache | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Backbone embeddings ``[N, D]`` (float32) of ``rows``, in order; cached rows skip the backbone."""
    device = torch.device(device) if isinstance(device, str) else device
    if not rows:
        dim = int(getattr(model, "embedding_dim", 0))
        return np.empty((0, dim), dtype=np.float32)
    embed = getattr(model, "embed", None) or getattr(model, "backbone", model)
    was_training = model.training
    model.eval()
    transform = make_transform(spec, train=False)
    out: list[np.ndarray | None] = [cache.get(r.sha256) if cache is not None else None for r in rows]
    todo = [i for i, v in enumerate(out) if v is None]
    try:
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            x = torch.stack([transform_stored(rows[i], transform) for i in idx]).to(device)
            feats = embed(x).float().cpu().numpy()
            for i, f in zip(idx, feats, strict=True):
                out[i] = f
                if cache is not None:
                    cache.put(rows[i].sha256, f)
    finally:
        model.train(was_training)
    return np.stack(out).astype(np.float32, copy=False)  # type: ignore[arg-type]
