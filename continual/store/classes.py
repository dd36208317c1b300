"""Classes: every label the store has seen, when it was first seen, and how many samples it has.

A row is added in the transaction that stores a label's first sample, so the
order of first sightings is the order in which new classes join the model. Sample
counts are read from ``samples`` (excluded samples do not count), so they never
drift from the rows. With a :class:`ClassLimit`, an insert that would make more
than ``max_classes`` classes known is refused as a whole (:class:`TooManyClasses`);
the check and the new rows are serialised (SQLite's write lock, a PostgreSQL
advisory lock), so two concurrent batches cannot both take the last place.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, text

from continual.store.engine import read_tx
from continual.store.schema import classes, samples

# Any fixed 64-bit number: the advisory lock a batch with a never-seen label takes on PostgreSQL.
_PG_CLASSES_LOCK = 0x636F6E74_636C6173  # "contclas"


@dataclass(frozen=True)
class ClassLimit:
    """At most ``max_classes`` classes known: the ``configured`` ones and every stored label."""

    max_classes: int
    configured: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassRow:
    label: str
    first_seen_at: datetime | None  # None: configured, no sample stored yet
    first_seq: int | None
    train: int
    holdout: int

    @property
    def samples(self) -> int:
        return self.train + self.holdout


class TooManyClasses(ValueError):
    """A batch whose new labels would make more than ``max_classes`` classes known; nothing was stored.

    ``where``: ``(index in the refused batch, label)`` of every sample carrying one of ``labels``.
    """

    def __init__(self, labels: Sequence[str], limit: int, known: int, where: Sequence[tuple[int, str]] = ()) -> None:
        self.labels, self.limit, self.known, self.where = list(labels), limit, known, list(where)
        super().__init__(
            f"new label(s) {self.labels[:10]} would make {known + len(self.labels)} classes; "
            f"[model] max_classes = {limit} ({known} known already)"
        )

    @property
    def details(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "field": "label", "message": f"new class {label!r} would exceed max_classes = {self.limit}"}
            for i, label in self.where
        ]


class Classes:
    """The ``classes`` table and the per-class counts; bound to one engine (``store.classes``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Labels this process knows to be in the table (see check_new): inserts skip their lookup.
        self.seen: set[str] = set()

    def names(self) -> list[str]:
        """Stored labels in the order they were first seen."""
        return [r.label for r in self.rows()]

    def rows(self, configured: Sequence[str] = ()) -> list[ClassRow]:
        """``configured`` classes first (in their order, stored or not), then every other label by first sighting."""
        with read_tx(self.engine) as conn:
            seen = conn.execute(select(classes).order_by(classes.c.first_seen_at, classes.c.first_seq, classes.c.label))
            first = {r.label: (r.first_seen_at, r.first_seq) for r in seen}
            counted = conn.execute(
                select(samples.c.split, samples.c.label, func.count())
                .where(samples.c.excluded.is_(False))
                .group_by(samples.c.split, samples.c.label)
            )
            counts = {(split, label): int(n) for split, label, n in counted}
        order = [*configured, *(c for c in first if c not in set(configured))]
        return [
            ClassRow(
                label=c,
                first_seen_at=first.get(c, (None, None))[0],
                first_seq=first.get(c, (None, None))[1],
                train=counts.get(("train", c), 0),
                holdout=counts.get(("holdout", c), 0),
            )
            for c in order
        ]


def check_new(
    conn: Connection,
    labels: Collection[str],
    limit: ClassLimit | None,
    batch_labels: Sequence[str] = (),
    seen: set[str] | None = None,
) -> list[str]:
    """The labels of a batch the store has never seen (sorted); raises :class:`TooManyClasses` past the limit.

    Call inside the insert's transaction, before the rows go in; then :func:`add_new`.
    ``seen``: labels known to be in the table already (a row is never deleted, so a
    label once seen needs no query again: most batches then cost no extra query);
    labels found in the table are added to it.
    """
    wanted = sorted(set(labels) - (seen or set()))
    if not wanted:
        return []
    new = _unseen(conn, wanted)
    if seen is not None:
        seen.update(c for c in wanted if c not in new)
    if not new:
        return []
    if conn.dialect.name == "postgresql":
        # Serialise batches that bring labels: the check below and the new rows are one step.
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CLASSES_LOCK})
        new = _unseen(conn, wanted)
    if limit is not None and new:
        known = set(conn.execute(select(classes.c.label)).scalars()) | set(limit.configured)
        beyond = [c for c in new if c not in known]
        if len(known) + len(beyond) > limit.max_classes:
            free = max(0, limit.max_classes - len(known))
            refused = beyond[free:]
            where = [(i, c) for i, c in enumerate(batch_labels) if c in set(refused)]
            raise TooManyClasses(refused, limit.max_classes, len(known), where)
    return new


def add_new(conn: Connection, new: Sequence[str], now: datetime, *, after: int) -> None:
    """Rows for labels first stored by this transaction, whose samples have seqs above ``after``."""
    for label in new:
        first_seq = conn.execute(
            select(func.min(samples.c.seq)).where(samples.c.seq > after, samples.c.label == label)
        ).scalar_one_or_none()
        conn.execute(insert(classes).values(label=label, first_seen_at=now, first_seq=first_seq))


def _unseen(conn: Connection, labels: Sequence[str]) -> list[str]:
    stored = set(conn.execute(select(classes.c.label).where(classes.c.label.in_(labels))).scalars())
    return [c for c in labels if c not in stored]
