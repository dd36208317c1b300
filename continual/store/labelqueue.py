"""The label queue's SQL (``store.label_queue``): unlabeled logged predictions to rank, and leases on them.

A candidate is a logged prediction with no label yet, whose input was kept (a
labeler must see it, and feedback by prediction id needs it), and that nobody
holds a live lease on. Leasing is one transaction per request: expired leases go,
then each wanted id is inserted with ``ON CONFLICT DO NOTHING`` — of two requests
racing for one prediction, exactly one gets it, on SQLite (one writer at a time)
and on PostgreSQL (the second insert waits for the first to commit, then skips).
Lease times are the caller's clock (the API process's), passed in as ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import Engine, delete, exists, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from continual.store.engine import read_tx, write_tx
from continual.store.lease import db_clock
from continual.store.schema import label_leases, predictions


@dataclass(frozen=True)
class QueueCandidate:
    """An unlabeled logged prediction with its input (an ``EmbeddableRow`` for the feature code)."""

    id: str
    created_at: datetime
    model_version: str
    label: str
    confidence: float
    scores: dict[str, float] | None
    kind: str
    sha256: str
    payload: bytes
    seq: int = 0  # not a sample

    @property
    def external_id(self) -> str:
        return f"prediction {self.id}"


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


class LabelQueue:
    """``label_leases`` and the candidate query over ``predictions``; bound to one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def candidates(self, *, limit: int, now: datetime, kind: str | None = None) -> list[QueueCandidate]:
        """The newest ``limit`` unlabeled predictions with a kept input and no live lease."""
        leased = exists().where(label_leases.c.prediction_id == predictions.c.id, label_leases.c.leased_until > now)
        q = (
            select(
                predictions.c.id, predictions.c.created_at, predictions.c.model_version, predictions.c.label,
                predictions.c.confidence, predictions.c.scores, predictions.c.kind, predictions.c.sha256,
                predictions.c.payload,
            )
            .where(predictions.c.labeled_at.is_(None), predictions.c.payload.is_not(None), ~leased)
            .order_by(predictions.c.id.desc())
            .limit(limit)
        )  # fmt: skip
        if kind is not None:
            q = q.where(predictions.c.kind == kind)
        with read_tx(self.engine) as conn:
            rows = conn.execute(q).all()
        return [
            QueueCandidate(
                id=r.id, created_at=_utc(r.created_at), model_version=r.model_version, label=r.label,
                confidence=float(r.confidence), scores=_scores(r.scores), kind=r.kind, sha256=r.sha256,
                payload=bytes(r.payload),
            )
            for r in rows
        ]  # fmt: skip

    def clock(self) -> datetime:
        """The database's current time (UTC). Leases are timed by it, as the trainer's lease is: API
        processes on hosts whose clocks disagree still agree on when an item comes back."""
        with read_tx(self.engine) as conn:
            value = conn.execute(select(db_clock(conn))).scalar_one()
        if isinstance(value, str):  # SQLite: text in the form its DateTime columns use
            value = datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%f")
        return _utc(value)

    def lease(self, ids: Sequence[str], *, now: datetime, seconds: float, holder: str = "") -> list[str]:
        """Lease the free ones among ``ids`` until ``now + seconds``; returns those leased, in the given order."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        until = now + timedelta(seconds=seconds)
        got: list[str] = []
        with write_tx(self.engine) as conn:
            conn.execute(delete(label_leases).where(label_leases.c.leased_until <= now))
            insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            for pid in dict.fromkeys(ids):
                stmt = (
                    insert(label_leases)
                    .values(prediction_id=pid, leased_at=now, leased_until=until, holder=holder[:255])
                    .on_conflict_do_nothing(index_elements=["prediction_id"])
                    .returning(label_leases.c.prediction_id)
                )
                # RETURNING rather than rowcount: psycopg reports no count for a skipped conflict.
                if conn.execute(stmt).first() is not None:
                    got.append(pid)
        return got

    def active(self, *, now: datetime) -> int:
        """How many leases are live at ``now``."""
        with read_tx(self.engine) as conn:
            q = select(func.count()).select_from(label_leases).where(label_leases.c.leased_until > now)
            return int(conn.execute(q).scalar_one())


def _scores(value: object) -> dict[str, float] | None:
    # The JSON column hands back a dict; rows written as raw JSON text by the log writer may come back as text.
    if value is None:
        return None
    if isinstance(value, str | bytes):
        value = orjson.loads(value)
    if not isinstance(value, dict):
        return None
    return {str(k): float(v) for k, v in value.items()}
