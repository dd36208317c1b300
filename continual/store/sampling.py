"""Samples read: counts, seeded random draws, the newest ones, streaming reads, and the narrow reads of training and drift.

Draws and counts read ``(seq, label)`` pairs only, never payloads; payloads are
read in chunks, by seq, when a batch needs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import Engine, and_, func, select
from sqlalchemy.sql.elements import ColumnElement

from continual.store.engine import read_tx
from continual.store.samples import SPLITS, PayloadRow, SampleRow
from continual.store.schema import samples


def _where(
    after: int | None = None, upto: int | None = None, split: str | None = None, label: str | None = None
) -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = [samples.c.excluded.is_(False)]
    if after is not None:
        conds.append(samples.c.seq > after)
    if upto is not None:
        conds.append(samples.c.seq <= upto)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        conds.append(samples.c.split == split)
    if label is not None:
        conds.append(samples.c.label == label)
    return and_(*conds)


def max_seq(engine: Engine) -> int:
    """The newest sample's seq (0 for an empty store)."""
    with read_tx(engine) as conn:
        return int(conn.execute(select(func.coalesce(func.max(samples.c.seq), 0))).scalar_one())


def count(
    engine: Engine,
    *,
    after: int | None = None,
    upto: int | None = None,
    split: str | None = None,
    label: str | None = None,
) -> int:
    with read_tx(engine) as conn:
        q = select(func.count()).select_from(samples).where(_where(after, upto, split, label))
        return int(conn.execute(q).scalar_one())


def label_counts(
    engine: Engine, *, after: int | None = None, upto: int | None = None, split: str | None = None
) -> dict[str, int]:
    with read_tx(engine) as conn:
        q = (
            select(samples.c.label, func.count())
            .where(_where(after, upto, split))
            .group_by(samples.c.label)
            .order_by(samples.c.label)
        )
        return {label: int(n) for label, n in conn.execute(q)}


def split_label_counts(engine: Engine) -> dict[tuple[str, str], int]:
    with read_tx(engine) as conn:
        q = (
            select(samples.c.split, samples.c.label, func.count())
            .where(_where())
            .group_by(samples.c.split, samples.c.label)
        )
        return {(split, label): int(n) for split, label, n in conn.execute(q)}


def draw(
    engine: Engine,
    k: int,
    *,
    after: int | None = None,
    upto: int | None = None,
    split: str | None = "train",
    balanced: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """A seeded random draw of up to ``k`` seqs from a range, sorted ascending.

    Only (seq, label) pairs are read — 16 bytes a row, never payloads. With
    ``balanced`` every label gets an equal share (rare labels give all they have,
    and their unused share goes to the others), so rare old classes survive replay.
    An unbalanced draw from a range much larger than ``k`` reads only about ``k``
    rows (:func:`_draw_sparse`), so its cost does not grow with the store.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not balanced and k > 0:
        lo, hi = _seq_range(engine, after, upto)
        if hi - lo + 1 > _SPARSE_FACTOR * k:
            drawn = _draw_sparse(engine, k, lo, hi, split, np.random.default_rng(seed))
            if drawn is not None:
                return drawn
    with read_tx(engine) as conn:
        rows = conn.execute(
            select(samples.c.seq, samples.c.label).where(_where(after, upto, split)).order_by(samples.c.seq)
        ).all()
    if not rows or k == 0:
        return np.empty(0, dtype=np.int64)
    seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    rng = np.random.default_rng(seed)
    if k >= len(seqs):
        return seqs
    if not balanced:
        return np.sort(rng.choice(seqs, size=k, replace=False))
    labels = np.array([r[1] for r in rows], dtype=object)
    groups = [seqs[labels == lab] for lab in sorted(set(labels.tolist()))]
    quotas = balanced_quotas([len(g) for g in groups], k)
    picked = [rng.choice(g, size=q, replace=False) for g, q in zip(groups, quotas, strict=True) if q]
    return np.sort(np.concatenate(picked))


# Above this many seqs per wanted sample, probing random seqs beats reading the range.
_SPARSE_FACTOR = 8


def _seq_range(engine: Engine, after: int | None, upto: int | None) -> tuple[int, int]:
    """The seqs a range can hold: (after, upto], clipped to what was ever stored (index lookups only)."""
    with read_tx(engine) as conn:
        top = int(conn.execute(select(func.coalesce(func.max(samples.c.seq), 0))).scalar_one())
        bottom = int(conn.execute(select(func.coalesce(func.min(samples.c.seq), 1))).scalar_one())
    lo = max(bottom, (after or 0) + 1)
    hi = top if upto is None else min(top, upto)
    return lo, hi


def _draw_sparse(
    engine: Engine, k: int, lo: int, hi: int, split: str | None, rng: np.random.Generator
) -> np.ndarray | None:
    """Uniform random seqs of ``[lo, hi]`` that are in play (and in ``split``), found by probing random seqs.

    Seqs are dense (excluded, deleted or other-split rows leave holes), so each probe
    is a hit with a steady probability: about ``k / hit rate`` rows are looked up by
    primary key instead of the whole range read. Rejection sampling without
    replacement keeps the draw uniform over the rows that are in play. None when
    the range is mostly holes (reading it is then the cheaper way).
    """
    span = hi - lo + 1
    tried: set[int] = set()
    found: list[int] = []
    hit_rate = 1.0
    while len(found) < k:
        want = k - len(found)
        probes = max(64, int(want / hit_rate * 1.2))
        if len(tried) + probes > span // 2:
            return None  # probing would revisit most of the range
        batch: list[int] = []
        while len(batch) < probes:
            for seq in (lo + rng.integers(0, span, size=2 * (probes - len(batch)))).tolist():
                if seq not in tried:
                    tried.add(seq)
                    batch.append(seq)
                    if len(batch) == probes:
                        break
        hits: list[int] = []
        with read_tx(engine) as conn:
            for i in range(0, len(batch), 500):
                q = select(samples.c.seq).where(samples.c.seq.in_(batch[i : i + 500]), _where(split=split))
                hits.extend(int(v) for v in conn.execute(q).scalars())
        hit_rate = len(hits) / len(batch)
        if hit_rate < 1 / _SPARSE_FACTOR:
            return None
        order = {seq: n for n, seq in enumerate(batch)}
        found.extend(sorted(hits, key=order.__getitem__)[:want])  # in probe order: the draw, not the ids, decides
    return np.sort(np.asarray(found, dtype=np.int64))


def balanced_quotas(available: Sequence[int], k: int) -> list[int]:
    """Split ``k`` as evenly as possible over groups, capped by what each group has."""
    # Max-min fair: visit groups from the smallest, each takes an equal share of
    # what is left (or all it has); rounding leftovers go to groups with room.
    quotas = [0] * len(available)
    remaining = min(k, sum(available))
    order = sorted(range(len(available)), key=lambda i: available[i])
    for rank, i in enumerate(order):
        quotas[i] = min(available[i], remaining // (len(order) - rank))
        remaining -= quotas[i]
    for i in reversed(order):
        if remaining == 0:
            break
        if quotas[i] < available[i]:
            quotas[i] += 1
            remaining -= 1
    return quotas


def newest(engine: Engine, n: int, *, after: int | None = None, split: str | None = None) -> np.ndarray:
    """The seqs of the newest ``n`` samples after ``after``, ascending."""
    with read_tx(engine) as conn:
        q = select(samples.c.seq).where(_where(after, None, split)).order_by(samples.c.seq.desc()).limit(n)
        return np.sort(np.array(conn.execute(q).scalars().all(), dtype=np.int64))


def iter_samples(
    engine: Engine,
    *,
    seqs: Iterable[int] | None = None,
    after: int | None = None,
    upto: int | None = None,
    split: str | None = None,
    batch_size: int = 500,
) -> Iterator[list[SampleRow]]:
    """Stream samples in seq order, ``batch_size`` rows at a time (keyset pagination)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seqs is not None:
        wanted = sorted({int(s) for s in seqs})
        for i in range(0, len(wanted), batch_size):
            chunk = wanted[i : i + batch_size]
            with read_tx(engine) as conn:
                rows = conn.execute(select(samples).where(samples.c.seq.in_(chunk), _where()).order_by(samples.c.seq))
                yield [SampleRow(**r._mapping) for r in rows]
        return
    cursor = after
    while True:
        with read_tx(engine) as conn:
            q = select(samples).where(_where(cursor, upto, split)).order_by(samples.c.seq).limit(batch_size)
            batch = [SampleRow(**r._mapping) for r in conn.execute(q)]
        if not batch:
            return
        yield batch
        cursor = batch[-1].seq


def train_index(
    engine: Engine,
    *,
    seqs: Sequence[int] | None = None,
    after: int | None = None,
    upto: int | None = None,
    labels: Sequence[str] | None = None,
) -> list[tuple[int, str, str]]:
    """(seq, external_id, label) of train-split rows in play: a few dozen bytes a row, never payloads."""
    cols = select(samples.c.seq, samples.c.external_id, samples.c.label).where(
        samples.c.split == "train", samples.c.excluded.is_(False)
    )
    out: list[tuple[int, str, str]] = []
    with read_tx(engine) as conn:
        if seqs is not None:
            wanted = sorted(int(s) for s in seqs)
            for i in range(0, len(wanted), 500):
                q = cols.where(samples.c.seq.in_(wanted[i : i + 500])).order_by(samples.c.seq)
                out.extend((int(r[0]), r[1], r[2]) for r in conn.execute(q))
            return out
        q = cols
        if labels is not None:
            q = q.where(samples.c.label.in_(list(labels)))
        if after is not None:
            q = q.where(samples.c.seq > after)
        if upto is not None:
            q = q.where(samples.c.seq <= upto)
        out.extend((int(r[0]), r[1], r[2]) for r in conn.execute(q.order_by(samples.c.seq)))
    return out


def payloads(engine: Engine, seqs: Sequence[int], *, chunk: int = 500) -> Iterator[list[PayloadRow]]:
    """Rows for ``seqs`` (any order), ``chunk`` per query, in seq order within a chunk."""
    wanted = sorted(int(s) for s in seqs)
    cols = select(samples.c.seq, samples.c.external_id, samples.c.kind, samples.c.payload)
    for i in range(0, len(wanted), chunk):
        with read_tx(engine) as conn:
            q = cols.where(samples.c.seq.in_(wanted[i : i + chunk])).order_by(samples.c.seq)
            yield [PayloadRow(int(r[0]), r[1], r[2], bytes(r[3])) for r in conn.execute(q)]


def hashes_and_labels(engine: Engine, seqs: Sequence[int], *, chunk: int = 500) -> dict[int, tuple[str, str]]:
    """seq -> (payload sha256, label): 16-100 bytes a row, so a drift window reads payloads only on a cache miss."""
    found: dict[int, tuple[str, str]] = {}
    wanted = [int(s) for s in seqs]
    for start in range(0, len(wanted), chunk):
        with read_tx(engine) as conn:
            q = select(samples.c.seq, samples.c.sha256, samples.c.label).where(
                samples.c.seq.in_(wanted[start : start + chunk])
            )
            found.update({int(seq): (sha, label) for seq, sha, label in conn.execute(q)})
    return found


def get_samples(engine: Engine, seqs: Iterable[int]) -> list[SampleRow]:
    return [row for batch in iter_samples(engine, seqs=seqs) for row in batch]


def vector_from_payload(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload, dtype=np.float32)
