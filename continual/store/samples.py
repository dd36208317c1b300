"""Samples: batched idempotent inserts, counts, random draws and streaming reads."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import numpy as np
from sqlalchemy import Connection, Dialect, Engine, and_, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from continual.store.engine import read_tx, write_tx
from continual.store.schema import samples

SPLITS = ("train", "holdout")
# The wire field each payload kind came in (a refused sample's details name it).
_INPUT_FIELD = {"vector": "x", "image": "image"}


class IdConflict(ValueError):
    """Sample ids already stored (or repeated in the batch) with a different label or payload.

    ``where``: ``(index in the refused batch, id)`` of every occurrence.
    """

    def __init__(self, ids: Sequence[str], where: Sequence[tuple[int, str]] = ()) -> None:
        self.ids = list(ids)
        self.where = list(where)
        shown = ", ".join(repr(i) for i in self.ids[:10]) + (" ..." if len(self.ids) > 10 else "")
        super().__init__(f"{len(self.ids)} sample id(s) already exist with a different label or input: {shown}")

    @property
    def details(self) -> list[dict[str, Any]]:
        return [{"index": i, "field": "id", "id": ext, "message": "id already stored with a different label or input"}
                for i, ext in self.where]  # fmt: skip


class PayloadTooLarge(ValueError):
    """Samples whose payload exceeds ``store.max_payload_bytes``: ``(index in the batch, id, kind, size)`` each."""

    def __init__(self, items: Sequence[tuple[int, str, str, int]], limit: int) -> None:
        self.items, self.limit = list(items), limit
        _, first_id, _, first_size = self.items[0]
        more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
        super().__init__(
            f"sample {first_id!r}: payload of {first_size} bytes exceeds store.max_payload_bytes = {limit}{more}"
        )

    @property
    def details(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "field": _INPUT_FIELD.get(kind, kind), "id": ext, "message": f"payload of {size} bytes "
             f"exceeds store.max_payload_bytes = {self.limit}"}
            for i, ext, kind, size in self.items
        ]  # fmt: skip


@dataclass(frozen=True)
class NewSample:
    external_id: str
    label: str
    kind: str  # "vector" (float32 bytes) | "image" (encoded PNG/JPEG bytes)
    payload: bytes
    source: str = ""
    meta: dict[str, Any] | None = None
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.payload).hexdigest())


@dataclass(frozen=True)
class SampleRow:
    seq: int
    external_id: str
    label: str
    kind: str
    sha256: str
    payload: bytes
    split: str
    ingested_at: datetime
    source: str
    meta: dict[str, Any] | None
    excluded: bool = False


@dataclass(frozen=True)
class PayloadRow:
    """The columns training needs: no timestamps or metadata to parse."""

    seq: int
    external_id: str
    kind: str
    payload: bytes


@dataclass(frozen=True)
class InsertResult:
    accepted: int
    duplicates: int


def split_of(external_id: str, holdout_fraction: float) -> str:
    """Train or holdout, a pure function of the id: it never changes once stored."""
    digest = hashlib.sha256(b"continual-split:" + external_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "holdout" if u < holdout_fraction else "train"


def insert_samples(
    engine: Engine,
    batch: Sequence[NewSample],
    *,
    holdout_fraction: float,
    max_payload_bytes: int,
    now: datetime | None = None,
) -> InsertResult:
    """Store a batch in one transaction, all or nothing.

    A sample whose id is stored already with the same label and payload is a
    duplicate (skipped); with a different label or payload it is a conflict and
    nothing in the batch is stored.
    """
    too_large = [
        (i, s.external_id, s.kind, len(s.payload)) for i, s in enumerate(batch) if len(s.payload) > max_payload_bytes
    ]
    if too_large:
        raise PayloadTooLarge(too_large, max_payload_bytes)
    unique, in_batch_dupes = _dedupe_batch(batch)
    if not unique:
        return InsertResult(0, in_batch_dupes)
    now = now or datetime.now(UTC)
    rows = [_row(s, holdout_fraction, now) for s in unique]
    # Fast path: a batch of new ids is one INSERT. If any id is stored already
    # the unique index refuses it, the transaction rolls back, and the slow path
    # below sorts duplicates from conflicts.
    try:
        with write_tx(engine) as conn:
            _insert_rows(conn, rows)
        return InsertResult(len(unique), in_batch_dupes)
    except IntegrityError:
        pass
    for attempt in range(2):
        try:
            with write_tx(engine) as conn:
                existing = {
                    r.external_id: (r.label, r.sha256)
                    for r in conn.execute(
                        select(samples.c.external_id, samples.c.label, samples.c.sha256).where(
                            samples.c.external_id.in_([s.external_id for s in unique])
                        )
                    )
                }
                conflicts = [
                    s.external_id
                    for s in unique
                    if s.external_id in existing and existing[s.external_id] != (s.label, s.sha256)
                ]
                if conflicts:
                    raise IdConflict(conflicts, _indices(batch, conflicts))
                fresh = [r for r in rows if r["external_id"] not in existing]
                if fresh:
                    _insert_rows(conn, fresh)
                return InsertResult(len(fresh), in_batch_dupes + len(unique) - len(fresh))
        except IntegrityError:
            # Another writer stored one of these ids between our read and write
            # (PostgreSQL read committed); the second pass sees it.
            if attempt:
                raise
    raise AssertionError("unreachable")


def _dedupe_batch(batch: Sequence[NewSample]) -> tuple[list[NewSample], int]:
    seen: dict[str, NewSample] = {}
    conflicts: list[str] = []
    for s in batch:
        prev = seen.get(s.external_id)
        if prev is None:
            seen[s.external_id] = s
        elif (prev.label, prev.sha256) != (s.label, s.sha256):
            conflicts.append(s.external_id)
    if conflicts:
        ids = sorted(set(conflicts))
        raise IdConflict(ids, _indices(batch, ids))
    return list(seen.values()), len(batch) - len(seen)


def _indices(batch: Sequence[NewSample], ids: Sequence[str]) -> list[tuple[int, str]]:
    wanted = set(ids)
    return [(i, s.external_id) for i, s in enumerate(batch) if s.external_id in wanted]


def _row(s: NewSample, holdout_fraction: float, now: datetime) -> dict[str, Any]:
    return {
        "external_id": s.external_id,
        "label": s.label,
        "kind": s.kind,
        "sha256": s.sha256,
        "payload": s.payload,
        "split": split_of(s.external_id, holdout_fraction),
        "ingested_at": now,
        "source": s.source,
        "meta": s.meta,
        "excluded": False,
    }


_INSERT_COLUMNS = [c for c in samples.c if c.name != "seq"]


@lru_cache(maxsize=8)
def _compiled_insert(dialect: Dialect) -> tuple[str, tuple[str, ...], tuple[Any, ...], bool]:
    stmt = insert(samples).inline().values({c.name: bindparam(c.name) for c in _INSERT_COLUMNS})
    compiled = stmt.compile(dialect=dialect)
    names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(c.name for c in _INSERT_COLUMNS)
    processors = tuple(samples.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names)
    return str(compiled), names, processors, bool(compiled.positional)


def _insert_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """executemany straight to the driver: SQLAlchemy's per-row parameter building
    costs more than SQLite's insert itself. Column types still convert values."""
    sql, names, processors, positional = _compiled_insert(conn.dialect)
    to_convert = [(i, f) for i, f in enumerate(processors) if f is not None]
    converted: dict[int, Any] = {}  # by id(): a batch shares one timestamp, convert it once
    params: list[Any] = []
    for row in rows:
        values = [row[n] for n in names]
        for i, process in to_convert:
            value = values[i]
            if value is not None:  # None stays SQL NULL, not JSON 'null'
                if id(value) not in converted:
                    converted[id(value)] = process(value)
                values[i] = converted[id(value)]
        params.append(tuple(values) if positional else dict(zip(names, values, strict=True)))
    conn.exec_driver_sql(sql, params)


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
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
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


def exclude(engine: Engine, external_ids: Sequence[str]) -> tuple[int, list[str]]:
    """Take samples out of play by id; returns (how many changed, ids not found). Idempotent."""
    ids = list(dict.fromkeys(external_ids))
    changed, found = 0, set()
    with write_tx(engine) as conn:
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            found |= set(conn.execute(select(samples.c.external_id).where(samples.c.external_id.in_(chunk))).scalars())
            changed += conn.execute(
                update(samples)
                .where(samples.c.external_id.in_(chunk), samples.c.excluded.is_(False))
                .values(excluded=True)
            ).rowcount
    return changed, [i for i in ids if i not in found]


def train_index(
    engine: Engine, *, seqs: Sequence[int] | None = None, after: int | None = None, upto: int | None = None
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
