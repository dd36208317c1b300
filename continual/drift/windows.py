"""Drift windows from the store, and their embeddings, cached per model version.

Reference: a seeded random draw (capped) of the champion's *old* samples, both
splits (the reference only describes the data the champion was trained against;
holdout rows come from the same stream). Because the seed is fixed, every check
against one champion draws the same reference, so after the first check its
embeddings are all cache hits. Current: the newest samples after the cutoff
(capped), so repeated checks embed only the samples that arrived since.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from continual.config import InputSettings
from continual.models.features import FeatureCache, backbone_hash, embed_rows
from continual.store import Store


@dataclass(frozen=True)
class Window:
    """Sample seqs with their payload hashes and labels (never payloads), ascending by seq."""

    seqs: np.ndarray
    sha256: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.seqs)


def select_windows(store: Store, *, cutoff: int, size: int, seed: int) -> tuple[Window, Window]:
    """(reference, current): up to ``size`` old samples (seeded draw) and the ``size`` newest new ones."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    ref = store.draw(size, upto=cutoff, split=None, seed=seed) if cutoff > 0 else np.empty(0, np.int64)
    cur = store.newest(size, after=cutoff)
    return read_window(store, ref), read_window(store, cur)


def read_window(store: Store, seqs: np.ndarray) -> Window:
    """Hashes and labels of ``seqs`` (16-100 bytes a row: the payload is read only on a cache miss)."""
    wanted = [int(s) for s in seqs]
    found = store.hashes_and_labels(wanted)
    kept = np.array([s for s in wanted if s in found], dtype=np.int64)  # deleted meanwhile: dropped
    return Window(kept, tuple(found[s][0] for s in kept), tuple(found[s][1] for s in kept))


class EmbeddingCache:
    """Embeddings by (backbone, payload sha256), and each model version's loaded model.

    A backbone is named by :func:`continual.models.features.backbone_hash` plus the
    input spec, so in ``feature_extraction`` mode a newly promoted champion (same
    frozen base) reuses every embedding of the previous one, and the training
    worker's on-disk feature cache (``<data_dir>/cache/features``, same hash) seeds
    the first check: the bootstrap run has already embedded the old train samples.
    The disk file is only read, never written, here (writing it every tick would
    cost more than it saves; the worker rewrites it on each run).

    Holds at most ``max_versions`` models/backbones (least recently used out) and
    ``max_items`` embeddings per backbone. ``computed`` counts samples that went
    through the backbone, ``hits`` those served from the cache.
    """

    def __init__(self, max_items: int = 20_000, max_versions: int = 2) -> None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        if max_versions < 1:
            raise ValueError(f"max_versions must be >= 1, got {max_versions}")
        self.max_items = max_items
        self.max_versions = max_versions
        self._features: OrderedDict[str, FeatureCache] = OrderedDict()
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._backbones: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0
        self.hits = 0

    def model(self, key: str, load: Callable[[], nn.Module]) -> nn.Module:
        """The model cached under ``key``, loaded once with ``load()``."""
        with self._lock:
            if key not in self._models:
                self._models[key] = load()
                self._evict(self._models)
            self._models.move_to_end(key)
            return self._models[key]

    def backbone(self, version_key: str, model: Callable[[], nn.Module]) -> str:
        """The backbone hash of the version under ``version_key`` (hashed once per version)."""
        with self._lock:
            known = self._backbones.get(version_key)
        if known is not None:
            return known
        digest = backbone_hash(model())  # outside the lock: model() may load through self.model()
        with self._lock:
            self._backbones[version_key] = digest
            while len(self._backbones) > 64:  # names only: a few bytes each
                self._backbones.popitem(last=False)
        return digest

    def embed(
        self,
        backbone: str,
        window: Window,
        *,
        model: Callable[[], nn.Module],
        store: Store,
        spec: InputSettings,
        device: torch.device,
        batch_size: int = 256,
        seed_dir: Path | None = None,
    ) -> np.ndarray:
        """Embeddings ``[len(window), D]``; only samples not cached for ``backbone`` are read and embedded.

        ``seed_dir``: a :class:`FeatureCache` directory whose ``<backbone>.npz`` (if any)
        fills this backbone's cache the first time it is used.
        """
        key = f"{backbone}:{spec_digest(spec)}"
        with self._lock:
            cache = self._features.get(key)
            if cache is None:
                cache = self._features[key] = FeatureCache(backbone, self.max_items, seed_dir)
                self._evict(self._features)
            self._features.move_to_end(key)
        # Several seqs may share a payload: embed each hash once.
        known: dict[str, np.ndarray] = {}
        for sha in dict.fromkeys(window.sha256):
            v = cache.get(sha)
            if v is not None:
                known[sha] = v
        todo = [int(s) for s, sha in zip(window.seqs, window.sha256, strict=True) if sha not in known]
        if todo:
            net = model()
            rows = {r.sha256: r for r in store.get_samples(todo)}
            missing = [h for h in dict.fromkeys(sha for sha in window.sha256 if sha not in known) if h not in rows]
            if missing:
                raise KeyError(f"{len(missing)} window sample(s) vanished from the store while embedding")
            fresh = list(rows.values())
            feats = embed_rows(net, fresh, spec=spec, batch_size=batch_size, device=device)
            for r, f in zip(fresh, feats, strict=True):
                known[r.sha256] = f
                cache.put(r.sha256, f)
            self.computed += len(fresh)
        self.hits += len(window) - len(todo)
        if not len(window):
            dim = next(iter(known.values())).shape[0] if known else 0
            return np.empty((0, dim), np.float32)
        return np.stack([known[sha] for sha in window.sha256]).astype(np.float32, copy=False)

    def _evict(self, d: OrderedDict) -> None:
        while len(d) > self.max_versions:
            d.popitem(last=False)


def spec_digest(spec: InputSettings) -> str:
    """The same backbone embeds differently at another input size or normalisation."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def cache_key(models_root: Path, version: str) -> str:
    """Versions are unique per registry; the root keeps two registries in one process apart."""
    return f"{Path(models_root).resolve()}:{version}"
