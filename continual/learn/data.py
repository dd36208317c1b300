"""Training data from the store: the run's data plan, a Dataset over seqs, and DataLoaders.

Nothing here loads the whole store: the plan reads (seq, id, label) triples, and
the dataset fetches a batch's payloads in one query when the DataLoader asks.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from continual.config import DEFAULT_MAX_IMAGE_PIXELS, InputSettings, Settings
from continual.learn.replay import (
    draw_old_validation,
    draw_replay,
    in_validation,
    old_validation_per_class,
    uses_replay,
)
from continual.models import make_transform
from continual.models.transforms import BadSample, StoredInput, transform_stored
from continual.store import Store


class NothingToTrain(RuntimeError):
    """No new train-split samples with a known label: nothing to train on.

    Not a failure of the trainer: ``store.runs.consecutive_failures`` skips runs whose
    error starts with this class name (``continual.store.runs.NOTHING_TO_TRAIN``).
    """

    def __init__(self, parent_cutoff: int, data_cutoff: int) -> None:
        self.parent_cutoff, self.data_cutoff = parent_cutoff, data_cutoff
        super().__init__(
            f"no new train-split samples with a known label between seq {parent_cutoff} (exclusive) "
            f"and {data_cutoff}: nothing to train on"
        )


@dataclass(frozen=True)
class RunData:
    """The samples of one run, fixed at its start: seqs and class indices, all from the train split."""

    parent_cutoff: int
    data_cutoff: int
    new: np.ndarray
    new_labels: np.ndarray
    replay: np.ndarray
    replay_labels: np.ndarray
    validation: np.ndarray
    validation_labels: np.ndarray
    skipped_unknown_labels: int

    @property
    def train(self) -> np.ndarray:
        return np.concatenate([self.new, self.replay])

    @property
    def train_labels(self) -> np.ndarray:
        return np.concatenate([self.new_labels, self.replay_labels])

    def summary(self) -> dict[str, int]:
        return {
            "parent_cutoff": int(self.parent_cutoff),
            "data_cutoff": int(self.data_cutoff),
            "new_samples": len(self.new),
            "replay_samples": len(self.replay),
            "validation_samples": len(self.validation),
            "skipped_unknown_labels": int(self.skipped_unknown_labels),
        }


def plan_run_data(
    store: Store,
    settings: Settings,
    *,
    parent_cutoff: int,
    data_cutoff: int,
    seed: int,
    classes: Sequence[str] | None = None,
    added: Sequence[str] = (),
) -> RunData:
    """New train samples in (parent_cutoff, data_cutoff], a replay draw at or before parent_cutoff.

    Only the train split is read, so holdout samples never reach training. The
    validation slice (for early stopping) is carved from both by id hash.
    ``classes``: the run's class list (default ``[model] classes``); samples of
    other labels are skipped. A class in ``added`` (new to the parent) counts
    all its samples as new, also those stored before ``parent_cutoff`` (they
    waited there until the class was ready), and every old class gets up to as
    many validation samples as a new class has (within the bounds of
    :func:`old_validation_per_class`) from the old data's validation slice
    (:func:`draw_old_validation`).
    """
    t = settings.training
    class_index = {c: i for i, c in enumerate(settings.model.classes if classes is None else classes)}
    new_rows = store.train_index(after=parent_cutoff, upto=data_cutoff)
    if added and parent_cutoff > 0:
        new_rows = sorted(new_rows + store.train_index(upto=parent_cutoff, labels=list(added)))
    replay_rows: list[tuple[int, str, str]] = []
    taken = {r[0] for r in new_rows} if parent_cutoff > 0 else set()  # the seqs already in the run
    if uses_replay(t.strategy) and parent_cutoff > 0:
        # Seeded by the cutoff too, so successive runs replay different old samples.
        drawn = draw_replay(store, t.replay_buffer, cutoff=parent_cutoff, seed=seed + parent_cutoff)
        replay_rows = [r for r in store.train_index(seqs=drawn.tolist()) if r[0] not in taken]
        taken.update(r[0] for r in replay_rows)
    if added and parent_cutoff > 0:
        # Every old class validated on about as many samples as a new class has, taken from the old data's
        # validation slice: the replay draw alone leaves a few per class.
        new_classes = set(added)
        n_added = sum(label in new_classes and in_validation(i, t.validation_fraction) for _, i, label in new_rows)
        per_class = old_validation_per_class(n_added, len(new_classes))
        old_labels = [c for c in class_index if c not in new_classes]
        extra = draw_old_validation(
            store, per_class, cutoff=parent_cutoff, labels=old_labels, fraction=t.validation_fraction,
            seed=seed + parent_cutoff,
        )  # fmt: skip
        replay_rows = replay_rows + [r for r in extra if r[0] not in taken]
    skipped = 0
    parts: dict[str, tuple[list[int], list[int]]] = {"new": ([], []), "replay": ([], []), "validation": ([], [])}
    for name, rows in (("new", new_rows), ("replay", replay_rows)):
        for seq, external_id, label in rows:
            idx = class_index.get(label)
            if idx is None:
                skipped += 1
                continue
            part = "validation" if in_validation(external_id, t.validation_fraction) else name
            parts[part][0].append(seq)
            parts[part][1].append(idx)
    if not parts["new"][0]:
        raise NothingToTrain(parent_cutoff, data_cutoff)

    def arr(name: str, i: int) -> np.ndarray:
        return np.asarray(parts[name][i], dtype=np.int64)

    return RunData(
        parent_cutoff=parent_cutoff,
        data_cutoff=data_cutoff,
        new=arr("new", 0),
        new_labels=arr("new", 1),
        replay=arr("replay", 0),
        replay_labels=arr("replay", 1),
        validation=arr("validation", 0),
        validation_labels=arr("validation", 1),
        skipped_unknown_labels=skipped,
    )


Transform = Callable[[Any], torch.Tensor]


def load_transform(spec: InputSettings, *, train: bool, max_pixels: int) -> Transform:
    return make_transform(spec, train=train, max_pixels=max_pixels)


def decode_row(row: StoredInput, transform: Transform) -> torch.Tensor:
    """``transform`` of a stored row; a row that cannot be decoded fails the run naming it (:class:`BadSample`)."""
    return transform_stored(row, transform)


class SampleDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Samples by seq, fetched from the store a batch at a time (``__getitems__``: one query per batch).

    Picklable for DataLoader worker processes: each process opens its own
    connection. Decoded vectors are kept in a bounded cache (``cache_items``),
    because re-decoding a few hundred bytes costs more than the training step;
    images and augmented inputs are decoded afresh every time, one at a time, and
    refused from their header above ``max_pixels`` (``ingest.max_image_pixels``).
    """

    def __init__(
        self,
        store_url: str,
        seqs: np.ndarray,
        labels: np.ndarray,
        spec: InputSettings,
        *,
        train: bool,
        cache_items: int = 0,
        store: Store | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if len(seqs) != len(labels):
            raise ValueError(f"seqs ({len(seqs)}) and labels ({len(labels)}) differ in length")
        self.store_url = store_url
        self.seqs = np.asarray(seqs, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.spec, self.train, self.max_pixels = spec, train, max_pixels
        self.cache_items = cache_items if spec.kind == "vector" and not (train and spec.augment) else 0
        self._store, self._pid = store, os.getpid()
        self._transform: Transform | None = None
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._matrix: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"], state["_transform"], state["_cache"], state["_matrix"] = None, None, OrderedDict(), None
        return state

    def _get_store(self) -> Store:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = Store(self.store_url), os.getpid()
        return self._store

    def __len__(self) -> int:
        return len(self.seqs)

    def preload(self) -> bool:
        """Decode every sample into the cache in one sequential pass, if they all fit; True if done.

        Reading 500 rows per query in seq order costs a fraction of fetching each
        random training batch by itself, so a small vector data set is read once.
        """
        if not self.cache_items or len(self.seqs) > self.cache_items:
            return False
        if self._transform is None:
            self._transform = load_transform(self.spec, train=self.train, max_pixels=self.max_pixels)
        decoded: dict[int, torch.Tensor] = {}
        for rows in self._get_store().payloads(self.seqs.tolist()):
            for row in rows:
                decoded[row.seq] = decode_row(row, self._transform)
        missing = [int(s) for s in self.seqs if int(s) not in decoded]
        if missing:
            raise BadSample(missing[0], "?", "no longer in the store")
        # One matrix in dataset order: a batch is then one index operation, not a stack of tensors.
        self._matrix = torch.stack([decoded[int(s)] for s in self.seqs])
        return True

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, idxs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._matrix is not None:
            t = torch.as_tensor(idxs)
            return self._matrix[t], self.labels[t]
        idxs = list(idxs)
        xs: list[torch.Tensor | None] = [self._cache.get(int(self.seqs[i])) for i in idxs]
        missing = [j for j, x in enumerate(xs) if x is None]
        if missing:
            if self._transform is None:
                self._transform = load_transform(self.spec, train=self.train, max_pixels=self.max_pixels)
            wanted = [int(self.seqs[idxs[j]]) for j in missing]
            rows = {r.seq: r for batch in self._get_store().payloads(wanted) for r in batch}
            for j, seq in zip(missing, wanted, strict=True):
                row = rows.get(seq)
                if row is None:
                    raise BadSample(seq, "?", "no longer in the store")
                x = decode_row(row, self._transform)
                xs[j] = x
                if self.cache_items:
                    self._cache[seq] = x
                    if len(self._cache) > self.cache_items:
                        self._cache.popitem(last=False)
        return torch.stack(xs), self.labels[idxs]  # type: ignore[arg-type]


class TensorBatches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs already in memory (cached frozen-base features): a batch is one index operation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x ({len(x)}) and y ({len(y)}) differ in length")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, idxs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idxs)
        return self.x[t], self.y[t]


def _as_batch(batch: Any) -> Any:  # Any: the collate hook passes through whatever __getitems__ built
    # __getitems__ returns a collated batch already.
    return batch


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def make_loader(
    dataset: Dataset[Any], batch_sampler: Iterable[list[int]], *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader[Any]:
    """Decoding and transforms run in ``num_workers`` processes, a few batches ahead of the step."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,  # type: ignore[arg-type]
        collate_fn=_as_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
