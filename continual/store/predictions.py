"""The prediction log and the accuracy windows over it (``store.predictions``).

``predictions``: one row per answered ``/v1/predict`` input, written in batches by the
serving process's log writer (``continual.predlog``). Ids sort by creation time, so
"newest first" and "the next window" are primary-key orders. A label that arrives later
by prediction id is stored as a sample (``Store.insert``, same transaction) and fills
the row's ``true_label``/``labeled_at``/``sample_id``.

``accuracy_windows``: consecutive windows of one version's predictions, each with the
label-free accuracy estimates computed when it closed and the realized accuracy of its
labeled predictions, refreshed as labels arrive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Engine, delete, func, insert, select, update

from continual.store.bulk import insert_rows
from continual.store.engine import read_tx, write_tx
from continual.store.schema import accuracy_windows, predictions, samples

# Ids per IN (...) query: well under SQLite's and PostgreSQL's parameter limits.
_CHUNK = 500
# The log's insert: one tuple per row in this order; scores already JSON text, floats already floats.
_COLUMNS = (
    "id", "created_at", "model_version", "label", "confidence", "distance", "scores",
    "kind", "sha256", "payload", "input_policy", "true_label", "labeled_at", "sample_id",
)  # fmt: skip
_RAW = frozenset({"scores", "confidence", "distance"})


class PredictionRecord(NamedTuple):
    """One prediction as the log writer stores it (a tuple: the writer makes one per prediction)."""

    id: str
    created_at: datetime
    model_version: str
    label: str
    confidence: float
    scores: dict[str, float] | None
    kind: str
    sha256: str
    payload: bytes | None
    input_policy: str  # [serving] log_inputs in force: "all" | "sampled" | "none"
    distance: float | None = None  # from the version's holdout, / its 99th percentile


@dataclass(frozen=True)
class LoggedPrediction:
    """A stored prediction, as feedback by reference reads it."""

    id: str
    created_at: datetime
    model_version: str
    label: str
    confidence: float
    kind: str
    sha256: str
    payload: bytes | None
    input_policy: str
    true_label: str | None
    labeled_at: datetime | None
    sample_id: str | None


@dataclass(frozen=True)
class LoggedInput:
    """A logged prediction's kept input, as adaptation reads it (a ``StoredInput`` for the transforms)."""

    id: str
    kind: str
    sha256: str
    payload: bytes
    seq: int = 0  # not a sample: errors name it by ``external_id``

    @property
    def external_id(self) -> str:
        return f"prediction {self.id}"


@dataclass(frozen=True)
class Outcome:
    """What the labels say about a set of predictions."""

    n_labeled: int
    n_correct: int
    true_labels: frozenset[str]


def _utc(when: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every time we write is UTC.
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


def _window(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for k in ("created_at", "first_at", "last_at", "realized_at"):
        out[k] = _utc(out[k])
    return out


class Predictions:
    """``predictions`` and ``accuracy_windows``; bound to one engine (``store.predictions``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- the log ------------------------------------------------------------------------------
    def insert(self, records: Sequence[PredictionRecord]) -> int:
        """Store a batch in one transaction (one executemany); returns how many."""
        if not records:
            return 0
        rows = [
            (
                r.id,
                r.created_at,
                r.model_version,
                r.label,
                float(r.confidence),
                None if r.distance is None else float(r.distance),
                # JSON text made here (orjson): the column type's json.dumps per row costs more than the insert.
                None if r.scores is None else orjson.dumps(r.scores).decode(),
                r.kind,
                r.sha256,
                r.payload,
                r.input_policy,
                None,  # true_label
                None,  # labeled_at
                None,  # sample_id
            )
            for r in records
        ]
        with write_tx(self.engine) as conn:
            insert_rows(conn, predictions, rows, columns=_COLUMNS, raw=_RAW)
        return len(rows)

    def get_many(self, ids: Sequence[str]) -> dict[str, LoggedPrediction]:
        """The stored predictions among ``ids`` (unknown ids are simply absent)."""
        wanted = list(dict.fromkeys(ids))
        out: dict[str, LoggedPrediction] = {}
        cols = [c for c in predictions.c if c.name != "scores"]
        with read_tx(self.engine) as conn:
            for i in range(0, len(wanted), _CHUNK):
                for r in conn.execute(select(*cols).where(predictions.c.id.in_(wanted[i : i + _CHUNK]))):
                    m = r._mapping
                    out[m["id"]] = LoggedPrediction(
                        id=m["id"],
                        created_at=_utc(m["created_at"]),  # type: ignore[arg-type]
                        model_version=m["model_version"],
                        label=m["label"],
                        confidence=float(m["confidence"]),
                        kind=m["kind"],
                        sha256=m["sha256"],
                        payload=None if m["payload"] is None else bytes(m["payload"]),
                        input_policy=m["input_policy"],
                        true_label=m["true_label"],
                        labeled_at=_utc(m["labeled_at"]),
                        sample_id=m["sample_id"],
                    )
        return out

    def logged_inputs(
        self, *, limit: int, before: datetime | None = None, kind: str | None = None
    ) -> tuple[list[LoggedInput], int]:
        """The newest ``limit`` kept inputs (made at or before ``before``), one per input hash; and how many repeats were skipped.

        Class-blind (labeled or not), and never the input of a holdout sample: the gate's
        holdouts must stay unseen, even without their labels.
        """
        holdout = select(samples.c.sha256).where(samples.c.split == "holdout")
        q = (
            select(predictions.c.id, predictions.c.kind, predictions.c.sha256, predictions.c.payload)
            .where(predictions.c.payload.is_not(None), predictions.c.sha256.not_in(holdout))
            .order_by(predictions.c.id.desc())
        )
        if before is not None:
            q = q.where(predictions.c.created_at <= before)
        if kind is not None:
            q = q.where(predictions.c.kind == kind)
        out: list[LoggedInput] = []
        seen: set[str] = set()
        repeats = 0
        with read_tx(self.engine) as conn:
            for r in conn.execute(q.execution_options(yield_per=_CHUNK)):
                if r.sha256 in seen:
                    repeats += 1
                    continue
                seen.add(r.sha256)
                out.append(LoggedInput(r.id, r.kind, r.sha256, bytes(r.payload)))
                if len(out) >= limit:
                    break
        return out, repeats

    def scores(self, prediction_id: str) -> dict[str, float] | None:
        with read_tx(self.engine) as conn:
            return conn.execute(  # type: ignore[no-any-return]
                select(predictions.c.scores).where(predictions.c.id == prediction_id)
            ).scalar_one_or_none()

    def count(self, *, version: str | None = None, labeled: bool | None = None) -> int:
        q = select(func.count()).select_from(predictions)
        if version is not None:
            q = q.where(predictions.c.model_version == version)
        if labeled is not None:
            q = q.where(predictions.c.labeled_at.is_not(None) if labeled else predictions.c.labeled_at.is_(None))
        with read_tx(self.engine) as conn:
            return int(conn.execute(q).scalar_one())

    def apply_retention(self, *, max_age_seconds: float, max_rows: int, now: datetime | None = None) -> int:
        """Delete predictions older than ``max_age_seconds`` and all but the newest ``max_rows``; returns how many.

        Windows whose predictions are all gone go with them.
        """
        cutoff = (now or datetime.now(UTC)) - timedelta(seconds=max_age_seconds)
        n = 0
        # Ids sort by time: walk the primary key from the oldest, a chunk per transaction, until
        # a chunk holds a prediction young enough to keep (no index on created_at to maintain).
        while True:
            with write_tx(self.engine) as conn:
                rows = conn.execute(
                    select(predictions.c.id, predictions.c.created_at).order_by(predictions.c.id).limit(_CHUNK)
                ).all()
                old = [r.id for r in rows if _utc(r.created_at) < cutoff]  # type: ignore[operator]
                if old:
                    n += conn.execute(delete(predictions).where(predictions.c.id.in_(old))).rowcount
            if len(old) < _CHUNK:
                break
        with write_tx(self.engine) as conn:
            # The (max_rows + 1)-th newest id and everything older go.
            edge = conn.execute(
                select(predictions.c.id).order_by(predictions.c.id.desc()).offset(max_rows).limit(1)
            ).scalar_one_or_none()
            if edge is not None:
                n += conn.execute(delete(predictions).where(predictions.c.id <= edge)).rowcount
            oldest = conn.execute(select(func.min(predictions.c.id))).scalar_one_or_none()
            gone = accuracy_windows.c.last_at < cutoff
            if oldest is None:
                gone = gone | accuracy_windows.c.id.is_not(None)
            else:
                gone = gone | (accuracy_windows.c.last_id < oldest)
            conn.execute(delete(accuracy_windows).where(gone))
        return int(n)

    def outcomes_by_version(self, versions: Sequence[str], *, last: int) -> dict[str, Outcome]:
        """Per version, its ``last`` most recently labeled predictions: how many, how many right."""
        out: dict[str, Outcome] = {}
        with read_tx(self.engine) as conn:
            for v in dict.fromkeys(versions):
                rows = conn.execute(
                    select(predictions.c.label, predictions.c.true_label)
                    .where(predictions.c.model_version == v, predictions.c.labeled_at.is_not(None))
                    .order_by(predictions.c.labeled_at.desc())
                    .limit(last)
                ).all()
                out[v] = Outcome(
                    len(rows), sum(1 for p, t in rows if p == t), frozenset(t for _, t in rows if t is not None)
                )
        return out

    # -- accuracy windows ----------------------------------------------------------------------
    def unwindowed(
        self, version: str, *, after_id: str | None, before: datetime, limit: int
    ) -> list[tuple[str, datetime, float, float | None]]:
        """(id, time, confidence, distance) of ``version``'s predictions after ``after_id`` made before ``before``, in id order.

        ``before`` leaves the newest moments out: another replica's writer may still hold
        predictions from them, and a window once closed never grows.
        """
        q = (
            select(predictions.c.id, predictions.c.created_at, predictions.c.confidence, predictions.c.distance)
            .where(predictions.c.model_version == version, predictions.c.created_at < before)
            .order_by(predictions.c.id)
            .limit(limit)
        )
        if after_id is not None:
            q = q.where(predictions.c.id > after_id)
        with read_tx(self.engine) as conn:
            return [
                (r.id, _utc(r.created_at), float(r.confidence), None if r.distance is None else float(r.distance))  # type: ignore[misc]
                for r in conn.execute(q)
            ]

    def add_window(
        self,
        *,
        version: str,
        ids: tuple[str, str],
        times: tuple[datetime, datetime],
        n: int,
        estimates: Mapping[str, float | None],
        flags: Sequence[str],
    ) -> int:
        with write_tx(self.engine) as conn:
            result = conn.execute(
                insert(accuracy_windows).values(
                    created_at=datetime.now(UTC),
                    model_version=version,
                    first_id=ids[0],
                    last_id=ids[1],
                    first_at=times[0],
                    last_at=times[1],
                    n=n,
                    estimates=dict(estimates),
                    flags=list(flags),
                    n_labeled=0,
                    n_correct=0,
                )
            )
            return int(result.inserted_primary_key[0])

    def last_window(self, version: str | None = None) -> dict[str, Any] | None:
        """The newest window (of ``version``), or None."""
        rows = self.windows(version=version, limit=1)
        return rows[0] if rows else None

    def windows(self, *, version: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Windows newest first."""
        q = select(accuracy_windows).order_by(accuracy_windows.c.id.desc()).limit(limit)
        if version is not None:
            q = q.where(accuracy_windows.c.model_version == version)
        with read_tx(self.engine) as conn:
            return [_window(r._mapping) for r in conn.execute(q)]

    def window_outcomes(self, windows: Sequence[Mapping[str, Any]]) -> dict[int, Outcome]:
        """What the labels say so far about each window's predictions."""
        out: dict[int, Outcome] = {}
        with read_tx(self.engine) as conn:
            for w in windows:
                in_window = (
                    predictions.c.model_version == w["model_version"],
                    predictions.c.id >= w["first_id"],
                    predictions.c.id <= w["last_id"],
                    predictions.c.labeled_at.is_not(None),
                )
                rows = conn.execute(select(predictions.c.label, predictions.c.true_label).where(*in_window)).all()
                out[int(w["id"])] = Outcome(
                    len(rows), sum(1 for p, t in rows if p == t), frozenset(t for _, t in rows if t is not None)
                )
        return out

    def set_outcomes(self, outcomes: Mapping[int, tuple[Outcome, Sequence[str]]]) -> None:
        """Record each window's labeled and correct counts and the true labels its version does not know."""
        if not outcomes:
            return
        now = datetime.now(UTC)
        with write_tx(self.engine) as conn:
            for window_id, (o, unknown) in outcomes.items():
                conn.execute(
                    update(accuracy_windows)
                    .where(accuracy_windows.c.id == window_id)
                    .values(
                        n_labeled=o.n_labeled,
                        n_correct=o.n_correct,
                        unknown_labels=sorted(unknown) or None,
                        realized_at=now if o.n_labeled else None,
                    )
                )
