"""The store: samples, versions, runs, decisions, drift checks and events in one database.

The only package that imports SQLAlchemy or writes SQL. :class:`Store` owns the
engine and the sample methods; the other tables have one owner each, reached as
``store.versions`` (model versions, the champion pointer), ``store.runs``
(training runs), ``store.records`` (gate decisions, drift checks, events),
``store.classes`` (every label's first sighting and sample counts), ``store.leases``
(the trainer lease), ``store.label_queue`` (leases on predictions handed out for labeling) and
``store.predictions`` (the prediction log and the accuracy
windows over it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

import numpy as np
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from continual.config import Settings, StoreSettings, read_secret_file
from continual.store import samples as _samples
from continual.store import sampling as _reads
from continual.store.classes import Classes, ClassLimit, ClassRow, TooManyClasses
from continual.store.engine import EngineOptions, StoreUnavailable, make_engine, read_tx
from continual.store.labelqueue import LabelQueue, QueueCandidate
from continual.store.lease import Leases
from continual.store.migrate import SchemaOutOfDate, check_schema, current_revision, head_revision, upgrade
from continual.store.predictions import LoggedInput, LoggedPrediction, Outcome, PredictionRecord, Predictions
from continual.store.records import Records
from continual.store.runs import RunActive, RunNotFound, RunNotPending, Runs
from continual.store.samples import (
    IdConflict,
    InsertResult,
    NewSample,
    PayloadRow,
    PayloadTooLarge,
    SampleRow,
    split_of,
)
from continual.store.sampling import vector_from_payload
from continual.store.versions import Champion, ChampionMoved, NoPreviousChampion, VersionNotFound, Versions

__all__ = [
    "Champion",
    "ChampionMoved",
    "ClassLimit",
    "ClassRow",
    "IdConflict",
    "InsertResult",
    "LabelQueue",
    "LoggedInput",
    "LoggedPrediction",
    "NewSample",
    "NoPreviousChampion",
    "Outcome",
    "PayloadRow",
    "PayloadTooLarge",
    "PredictionRecord",
    "QueueCandidate",
    "RunActive",
    "RunNotFound",
    "RunNotPending",
    "SampleRow",
    "SchemaOutOfDate",
    "Store",
    "StoreUnavailable",
    "TooManyClasses",
    "VersionNotFound",
    "split_of",
    "vector_from_payload",
]


def store_url(s: StoreSettings) -> str:
    """The SQLAlchemy URL of a store section, with the password from ``password_file`` put in."""
    if not s.password_file:
        return s.url
    password = read_secret_file(s.password_file).strip()
    return make_url(s.url).set(password=password).render_as_string(hide_password=False)


class Store:
    """One database, bound to the settings that shape its rows."""

    def __init__(
        self,
        url: str,
        *,
        holdout_fraction: float = 0.2,
        max_payload_bytes: int = 1_048_576,
        busy_timeout_ms: int = 5_000,
        pool_size: int = 8,
        options: EngineOptions | None = None,
    ) -> None:
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.url = url
        self.holdout_fraction = holdout_fraction
        self.max_payload_bytes = max_payload_bytes
        opts = options or EngineOptions(busy_timeout_ms=busy_timeout_ms, pool_size=pool_size)
        self.engine: Engine = make_engine(url, opts)
        self.versions = Versions(self.engine)
        self.runs = Runs(self.engine)
        self.records = Records(self.engine)
        self.leases = Leases(self.engine)
        self.predictions = Predictions(self.engine)
        self.classes = Classes(self.engine)
        self.label_queue = LabelQueue(self.engine)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The configured store: the SQLite default in the data dir, or ``[store] url`` with its password file."""
        s = settings.resolved_store()
        return cls(
            store_url(s),
            holdout_fraction=s.holdout_fraction,
            max_payload_bytes=s.max_payload_bytes,
            options=EngineOptions(
                busy_timeout_ms=s.busy_timeout_ms,
                pool_size=s.pool_size,
                pool_timeout=s.pool_timeout_seconds,
                connect_timeout=s.connect_timeout_seconds,
                statement_timeout=s.statement_timeout_seconds,
                sqlite_synchronous=s.sqlite_synchronous,
            ),
        )

    # -- schema ---------------------------------------------------------------
    def upgrade(self, revision: str = "head") -> None:
        upgrade(self.engine, revision)

    def check_schema(self) -> None:
        check_schema(self.engine)

    def revision(self) -> str | None:
        return current_revision(self.engine)

    @staticmethod
    def head() -> str:
        return head_revision()

    def ping(self) -> bool:
        try:
            with read_tx(self.engine) as conn:
                conn.execute(text("SELECT 1"))
            return True
        except StoreUnavailable:
            return False

    def dispose(self) -> None:
        self.engine.dispose()

    # -- samples --------------------------------------------------------------
    def insert(
        self, batch: Sequence[NewSample], now: datetime | None = None, *, class_limit: ClassLimit | None = None
    ) -> InsertResult:
        return _samples.insert_samples(
            self.engine,
            batch,
            holdout_fraction=self.holdout_fraction,
            max_payload_bytes=self.max_payload_bytes,
            now=now,
            class_limit=class_limit,
            seen_labels=self.classes.seen,
        )

    def split_of(self, external_id: str) -> str:
        return split_of(external_id, self.holdout_fraction)

    def max_seq(self) -> int:
        return _reads.max_seq(self.engine)

    def count(
        self, *, after: int | None = None, upto: int | None = None, split: str | None = None, label: str | None = None
    ) -> int:
        return _reads.count(self.engine, after=after, upto=upto, split=split, label=label)

    def label_counts(
        self, *, after: int | None = None, upto: int | None = None, split: str | None = None
    ) -> dict[str, int]:
        return _reads.label_counts(self.engine, after=after, upto=upto, split=split)

    def split_label_counts(self) -> dict[tuple[str, str], int]:
        return _reads.split_label_counts(self.engine)

    def draw(
        self,
        k: int,
        *,
        after: int | None = None,
        upto: int | None = None,
        split: str | None = "train",
        balanced: bool = False,
        seed: int = 0,
    ) -> np.ndarray:
        return _reads.draw(self.engine, k, after=after, upto=upto, split=split, balanced=balanced, seed=seed)

    def newest(self, n: int, *, after: int | None = None, split: str | None = None) -> np.ndarray:
        return _reads.newest(self.engine, n, after=after, split=split)

    def iter_samples(
        self,
        *,
        seqs: Iterable[int] | None = None,
        after: int | None = None,
        upto: int | None = None,
        split: str | None = None,
        batch_size: int = 500,
    ) -> Iterator[list[SampleRow]]:
        return _reads.iter_samples(self.engine, seqs=seqs, after=after, upto=upto, split=split, batch_size=batch_size)

    def exclude(
        self, external_ids: Sequence[str], *, reason: str = "", actor: str = "unknown"
    ) -> tuple[int, list[str]]:
        """Take samples out of play (training, holdouts, drift, pending); returns (changed, unknown ids).

        One transaction with its ``samples_excluded`` event (``reason``, ``actor``, the first 100 ids).
        """
        return _samples.exclude(self.engine, external_ids, reason=reason, actor=actor)

    def get_samples(self, seqs: Iterable[int]) -> list[SampleRow]:
        return _reads.get_samples(self.engine, seqs)

    def train_index(
        self,
        *,
        seqs: Sequence[int] | None = None,
        after: int | None = None,
        upto: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[tuple[int, str, str]]:
        """(seq, external_id, label) of the train-split samples in play, by seqs or by range (and labels)."""
        return _reads.train_index(self.engine, seqs=seqs, after=after, upto=upto, labels=labels)

    def payloads(self, seqs: Sequence[int], *, chunk: int = 500) -> Iterator[list[PayloadRow]]:
        return _reads.payloads(self.engine, seqs, chunk=chunk)

    def hashes_and_labels(self, seqs: Sequence[int]) -> dict[int, tuple[str, str]]:
        return _reads.hashes_and_labels(self.engine, seqs)
