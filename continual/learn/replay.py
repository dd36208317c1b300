"""Replay: which old samples come back, the validation slice, and how batches mix old and new.

Plain functions over seqs and ids; nothing here reads payloads or touches torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import numpy as np

from continual.store import Store

STRATEGIES = ("naive", "replay", "ewc", "replay+ewc")


def uses_replay(strategy: str) -> bool:
    _check_strategy(strategy)
    return strategy in ("replay", "replay+ewc")


def uses_ewc(strategy: str) -> bool:
    _check_strategy(strategy)
    return strategy in ("ewc", "replay+ewc")


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"training.strategy must be one of {STRATEGIES}, got {strategy!r}")


def draw_replay(store: Store, k: int, *, cutoff: int, seed: int) -> np.ndarray:
    """A class-balanced draw of up to ``k`` old train-split seqs (seq <= cutoff), sorted.

    Balanced so that rare old classes survive: every label gets an equal share
    and a label with fewer samples gives all it has.
    """
    if k < 0:
        raise ValueError(f"replay_buffer must be >= 0, got {k}")
    if cutoff <= 0 or k == 0:
        return np.empty(0, dtype=np.int64)
    return store.draw(k, upto=cutoff, split="train", balanced=True, seed=seed)


# A run that adds classes validates every old class on at least this many samples (when the store has them):
# the gate judges old classes one by one, and with a handful each one sample moves a class's recall by 10%.
MIN_OLD_VALIDATION = 20
# ... and at most this many: the standard error of a recall is then under 0.04, and a large new class does not
# make every epoch's validation (and the draw) grow with the number of old classes times its size.
MAX_OLD_VALIDATION = 200


def old_validation_per_class(n_new_validation: int, n_new_classes: int) -> int:
    """How many validation samples each old class gets in a run that adds classes: as many as a new class
    has on average, within ``[MIN_OLD_VALIDATION, MAX_OLD_VALIDATION]``.

    >>> old_validation_per_class(45, 3), old_validation_per_class(90, 2), old_validation_per_class(5000, 1)
    (20, 45, 200)
    """
    if n_new_classes < 1 or n_new_validation < 0:
        raise ValueError(f"need n_new_classes >= 1 and n_new_validation >= 0, got {n_new_classes}, {n_new_validation}")
    return min(MAX_OLD_VALIDATION, max(MIN_OLD_VALIDATION, math.ceil(n_new_validation / n_new_classes)))


def draw_old_validation(
    store: Store, per_class: int, *, cutoff: int, labels: Sequence[str], fraction: float, seed: int
) -> list[tuple[int, str, str]]:
    """Up to ``per_class`` train rows ``(seq, id, label)`` of each of ``labels`` at or before ``cutoff``, all in
    the validation slice (:func:`in_validation`), in seq order.

    For a run that adds classes: the replay draw brings only its own share of
    the old classes' validation samples (a tenth of the buffer, a few per
    class), too few to fit the bias correction or to pick the epoch on every
    class's recall. The validation slice is the same in every run, so these
    samples were never trained on, here or before. One class-balanced draw of
    ``(seq, label)`` pairs large enough to hold the wanted share of each label,
    then the ids of only those rows: the cost is that of the replay draw.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    wanted = set(labels)
    if per_class == 0 or fraction <= 0 or cutoff <= 0 or not wanted:
        return []
    n_labels = len(store.label_counts(upto=cutoff, split="train"))
    # Each label's quota holds about per_class validation rows, with room for the hash's spread.
    quota = math.ceil(per_class / fraction * 1.5) + 10
    drawn = store.draw(quota * n_labels, upto=cutoff, split="train", balanced=True, seed=seed)
    taken: dict[str, int] = {}
    out: list[tuple[int, str, str]] = []
    for seq, external_id, label in store.train_index(seqs=drawn.tolist()):
        if label in wanted and taken.get(label, 0) < per_class and in_validation(external_id, fraction):
            taken[label] = taken.get(label, 0) + 1
            out.append((seq, external_id, label))
    return out


def balanced_replay_ratio(n_old_classes: int, n_classes: int) -> float:
    """The replayed share of a batch that gives every class the same share: the old classes' share of the list.

    For a run that adds classes (``[training] class_balanced_batches``): with the
    configured ratio (0.5) three new digits would get half of every batch and
    seven old ones the other half, so each new class pulled on the shared
    features more than twice as hard as each old one.

    >>> balanced_replay_ratio(7, 10)
    0.7
    """
    if not 1 <= n_old_classes < n_classes:
        raise ValueError(f"need 1 <= n_old_classes < n_classes, got {n_old_classes} of {n_classes}")
    return n_old_classes / n_classes


def in_validation(external_id: str, fraction: float) -> bool:
    """Whether a train-split sample belongs to the early-stopping slice: a pure function of its id.

    The salt differs from the train/holdout split's, so the slice is an
    independent share of the train split; the same sample is in it in every run,
    so no run ever trains on another run's validation samples.
    """
    if fraction <= 0:
        return False
    digest = hashlib.sha256(b"continual-validation:" + external_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def replay_per_batch(batch_size: int, replay_ratio: float, n_replay: int) -> int:
    """How many of a batch's ``batch_size`` slots hold replayed samples."""
    if n_replay == 0 or replay_ratio <= 0:
        return 0
    # At least one new sample per batch, or an epoch over the new data never ends.
    return min(batch_size - 1, max(1, round(batch_size * replay_ratio)))


class MixedBatchSampler:
    """Batches of indices into ``[new..., replay...]``: each holds ``n_new`` new and ``n_replay`` replayed.

    An epoch is one pass over the new samples in a seeded random order; replayed
    samples are cycled through in their own shuffled order. For several ranks
    (DistributedDataParallel) every rank computes the same global sequence and
    takes every ``world_size``-th batch, so ranks see disjoint batches and the same
    number of steps.

    >>> s = MixedBatchSampler(n_new=6, n_replay=4, batch_size=4, replay_ratio=0.5, seed=1)
    >>> [len(b) for b in s], len(s)
    ([4, 4, 4], 3)
    >>> all(sum(i >= 6 for i in b) == 2 for b in s)
    True
    """

    def __init__(
        self,
        *,
        n_new: int,
        n_replay: int,
        batch_size: int,
        replay_ratio: float,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1 (nothing new to learn), got {n_new}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= replay_ratio < 1:
            raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n_new, self.n_replay = n_new, n_replay
        self.batch_size, self.replay_ratio = batch_size, replay_ratio
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_batch_replay = replay_per_batch(batch_size, replay_ratio, n_replay)
        self.per_batch_new = batch_size - self.per_batch_replay
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> int:
        return -(-self.n_new // self.per_batch_new)

    def __len__(self) -> int:
        # Every rank takes the same number of batches; a remainder shorter than
        # world_size is dropped (it comes back in the next epoch's order).
        return max(1, self._global_batches() // self.world_size)

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        new_order = rng.permutation(self.n_new)
        replay_order = rng.permutation(self.n_replay) + self.n_new if self.n_replay else np.empty(0, np.int64)
        out: list[list[int]] = []
        r = 0
        for b in range(self._global_batches()):
            idx = new_order[b * self.per_batch_new : (b + 1) * self.per_batch_new].tolist()
            for _ in range(self.per_batch_replay):
                idx.append(int(replay_order[r % self.n_replay]))
                r += 1
            out.append(idx)
        if self.world_size > 1:
            n = len(self) * self.world_size
            if len(out) < n:  # fewer batches than ranks: repeat so every rank steps once
                out = (out * n)[:n]
            out = out[:n][self.rank :: self.world_size]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())


def class_balance(labels: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return out
