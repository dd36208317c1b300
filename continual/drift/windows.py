"""Drift windows from the store, and their embeddings, cached per model version.

Reference: a seeded random draw (capped) of the champion's *old* samples, both
splits (the reference only describes the data the champion was trained against;
holdout rows come from the same stream). Because the seed is fixed, every check
against one champion draws the same reference, so after the first check its
embeddings are all cache hits. Current: the newest samples after the cutoff
(capped), so repeated checks embed only the samples that arrived since.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select
from torch import nn

from continual.config import InputSettings
from continual.learn.features import FeatureCache, embed_samples
from continual.store import Store
from continual.store.engine import read_tx
from continual.store.schema import samples

_READ_CHUNK = 500


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
    found: dict[int, tuple[str, str]] = {}
    wanted = [int(s) for s in seqs]
    for start in range(0, len(wanted), _READ_CHUNK):
        chunk = wanted[start : start + _READ_CHUNK]
        with read_tx(store.engine) as conn:
            q = select(samples.c.seq, samples.c.sha256, samples.c.label).where(samples.c.seq.in_(chunk))
            found.update({int(seq): (sha, label) for seq, sha, label in conn.execute(q)})
    kept = np.array([s for s in wanted if s in found], dtype=np.int64)  # deleted meanwhile: dropped
    return Window(kept, tuple(found[s][0] for s in kept), tuple(found[s][1] for s in kept))


class EmbeddingCache:
    """Embeddings by (model version, payload sha256), and each version's loaded model.

    Holds at most ``max_versions`` versions (least recently used out) and
    ``max_items`` embeddings per version. ``computed`` counts samples that went
    through the backbone, ``hits`` those served from the cache: tests and the
    check's report read them.
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

    def embed(
        self,
        key: str,
        window: Window,
        *,
        model: Callable[[], nn.Module],
        store: Store,
        spec: InputSettings,
        device: torch.device,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Embeddings ``[len(window), D]``; only samples not cached under ``key`` are read and embedded."""
        with self._lock:
            cache = self._features.get(key)
            if cache is None:
                cache = self._features[key] = FeatureCache(key, self.max_items)
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
            feats = embed_samples(net, fresh, spec=spec, batch_size=batch_size, device=device)
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


def cache_key(models_root: Path, version: str) -> str:
    """Versions are unique per registry; the root keeps two registries in one process apart."""
    return f"{Path(models_root).resolve()}:{version}"
