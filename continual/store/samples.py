"""Samples written: rows, ids and splits, batched idempotent inserts, exclusion. Reads are in ``sampling``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from continual.store import classes as _classes
from continual.store.bulk import insert_rows
from continual.store.classes import ClassLimit
from continual.store.engine import write_tx
from continual.store.records import _event
from continual.store.schema import predictions, samples

SPLITS = ("train", "holdout")
# The wire field each payload kind came in (a refused sample's details name it).
_INPUT_FIELD = {"vector": "x", "image": "image", "text": "text"}


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
    kind: str  # "vector" (float32 bytes) | "image" (encoded PNG/JPEG bytes) | "text" (UTF-8)
    payload: bytes
    source: str = ""
    meta: dict[str, Any] | None = None
    sha256: str = field(default="")
    # Built from a logged prediction (feedback by reference): storing the sample labels it.
    prediction_id: str | None = None
    predicted_at: datetime | None = None

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
    # (prediction id, prediction time) of each stored sample built from a logged prediction.
    labeled: tuple[tuple[str, datetime], ...] = ()


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
    class_limit: ClassLimit | None = None,
    seen_labels: set[str] | None = None,
) -> InsertResult:
    """Store a batch in one transaction, all or nothing.

    A sample whose id is stored already with the same label and payload is a
    duplicate (skipped); with a different label or payload it is a conflict and
    nothing in the batch is stored. A label never stored before gets its row in
    ``classes`` in the same transaction; ``class_limit`` refuses the batch
    (:class:`~continual.store.classes.TooManyClasses`) when its new labels would
    make too many classes. ``seen_labels``: labels known to have their row (see
    :func:`continual.store.classes.check_new`); updated once the batch committed.
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
    labels = [s.label for s in batch]
    try:
        with write_tx(engine) as conn:
            new = _insert_with_classes(conn, rows, now, class_limit, labels, seen_labels)
            _link_predictions(conn, unique, now)
        _remember(seen_labels, new)
        return InsertResult(len(unique), in_batch_dupes, _labeled(unique))
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
                new = _insert_with_classes(conn, fresh, now, class_limit, labels, seen_labels) if fresh else []
                fresh_samples = [s for s in unique if s.external_id not in existing]
                _link_predictions(conn, fresh_samples, now)
            _remember(seen_labels, new)
            return InsertResult(len(fresh), in_batch_dupes + len(unique) - len(fresh), _labeled(fresh_samples))
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


def _insert_with_classes(
    conn: Connection,
    rows: list[dict[str, Any]],
    now: datetime,
    limit: ClassLimit | None,
    labels: Sequence[str],
    seen: set[str] | None,
) -> list[str]:
    """Insert the rows and the ``classes`` rows of labels they bring; returns those labels."""
    new = _classes.check_new(conn, {r["label"] for r in rows}, limit, labels, seen)
    after = int(conn.execute(select(func.coalesce(func.max(samples.c.seq), 0))).scalar_one()) if new else 0
    _insert_rows(conn, rows)
    _classes.add_new(conn, new, now, after=after)
    return new


def _remember(seen: set[str] | None, new: list[str]) -> None:
    # Only after the commit: a rolled-back batch's labels have no row.
    if seen is not None:
        seen.update(new)


def _insert_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    insert_rows(conn, samples, rows)


def _link_predictions(conn: Connection, fresh: Sequence[NewSample], now: datetime) -> None:
    """Fresh samples built from logged predictions label them: the first label of a prediction wins."""
    linked = [
        {"pid": s.prediction_id, "true_label": s.label, "labeled_at": now, "sample_id": s.external_id}
        for s in fresh
        if s.prediction_id
    ]
    if linked:
        conn.execute(
            update(predictions)
            .where(predictions.c.id == bindparam("pid"), predictions.c.labeled_at.is_(None))
            .values(true_label=bindparam("true_label"), labeled_at=bindparam("labeled_at"),
                    sample_id=bindparam("sample_id")),
            linked,
        )  # fmt: skip


def _labeled(fresh: Sequence[NewSample]) -> tuple[tuple[str, datetime], ...]:
    return tuple((s.prediction_id, s.predicted_at) for s in fresh if s.prediction_id and s.predicted_at)


def exclude(engine: Engine, external_ids: Sequence[str], *, reason: str, actor: str) -> tuple[int, list[str]]:
    """Take samples out of play by id; returns (how many changed, ids not found). Idempotent.

    The ``samples_excluded`` event is written in the same transaction: an exclusion is
    never committed without its audit record, nor the record without the exclusion.
    """
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
        unknown = [i for i in ids if i not in found]
        _event(
            conn,
            "samples_excluded",
            f"{changed} samples excluded by {actor}: {reason}",
            {"ids": ids[:100], "n": changed, "unknown": unknown[:100], "reason": reason, "actor": actor},
        )
    return changed, unknown
