"""Model versions and the champion pointer: the ``model_versions`` rows and the append-only history.

The champion is the version of the newest ``champion_history`` row, read by one
query (:meth:`Versions.champion`). Moving it is a compare-and-swap: the caller
states which champion it expects (``None``: none yet), and :meth:`Versions.move`
refuses with :class:`ChampionMoved` — changing nothing — when another move
landed first. Moves are serialised in the database (SQLite takes the write lock
at ``BEGIN``; PostgreSQL takes a transaction-scoped advisory lock), so two moves
can never both see the same champion and both succeed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from continual.store.engine import read_tx, write_tx
from continual.store.schema import champion_history, model_versions

# Statuses a version row moves through; "deleted" versions keep their row (audit) but no files.
STATUSES = ("candidate", "champion", "retired", "rejected", "deleted")
# Any fixed 64-bit number: the advisory lock every champion move takes on PostgreSQL.
_PG_MOVE_LOCK = 0x636F6E74_6D6F7665  # "contmove"


class VersionNotFound(KeyError):
    def __init__(self, version: str, reason: str = "no such version") -> None:
        self.version = version
        super().__init__(version)
        self.message = f"model version {version!r}: {reason}"

    def __str__(self) -> str:
        return self.message


class ChampionMoved(RuntimeError):
    """A champion move whose expectation is stale: the pointer is elsewhere, nothing changed."""

    def __init__(self, expected: str | None, actual: str | None, version: str) -> None:
        self.expected, self.actual, self.version = expected, actual, version
        super().__init__(
            f"not moving the champion to {version}: expected the champion to be {expected or 'none'}, "
            f"but it is {actual or 'none'} (another promotion or rollback landed first)"
        )


class NoPreviousChampion(LookupError):
    """Rollback asked for, but there is no earlier champion to go back to."""


@dataclass(frozen=True)
class Champion:
    """The newest champion-history row with what its version row says."""

    version: str
    previous: str | None
    promoted_at: datetime
    reason: str  # gate | manual | rollback | import | bootstrap | recovery
    actor: str
    details: dict[str, Any] | None
    architecture: str
    data_cutoff: int
    metrics: dict[str, Any] | None
    classes: tuple[str, ...] | None = None  # None: a row written before the store recorded classes


class Versions:
    """``model_versions`` and ``champion_history``; bound to one engine (``store.versions``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- the champion ----------------------------------------------------------------
    def champion(self) -> Champion | None:
        with read_tx(self.engine) as conn:
            return _champion(conn)

    def champion_version(self) -> str | None:
        c = self.champion()
        return c.version if c else None

    def move(
        self,
        version: str,
        *,
        expected: str | None,
        reason: str,
        actor: str = "",
        details: Mapping[str, Any] | None = None,
        during: Callable[[], None] | None = None,
    ) -> bool:
        """Make ``version`` champion if the champion is still ``expected``; False if it is ``version`` already.

        One transaction: the history row and both statuses. Raises :class:`ChampionMoved`
        when the champion is not ``expected``, :class:`VersionNotFound` when ``version``
        has no row or was deleted. ``during`` runs inside the open transaction (a test
        hook that kills the process there: the pointer must stay where it was).
        """
        with write_tx(self.engine) as conn:
            _serialise_moves(conn)
            current = _champion(conn)
            actual = current.version if current else None
            if actual != expected:
                raise ChampionMoved(expected, actual, version)
            if actual == version:
                # The history's ``previous`` always names another version, so rollback always changes the model.
                return False
            status = conn.execute(
                select(model_versions.c.status).where(model_versions.c.version == version)
            ).scalar_one_or_none()
            if status is None:
                raise VersionNotFound(version, "not registered in the store")
            if status == "deleted":
                raise VersionNotFound(version, "deleted by retention; its files are gone")
            conn.execute(
                insert(champion_history).values(
                    version=version,
                    previous=actual,
                    promoted_at=datetime.now(UTC),
                    reason=reason,
                    actor=actor or "",
                    details=dict(details) if details is not None else None,
                )
            )
            if during is not None:
                during()
            if actual is not None:
                conn.execute(update(model_versions).where(model_versions.c.version == actual).values(status="retired"))
            conn.execute(update(model_versions).where(model_versions.c.version == version).values(status="champion"))
        return True

    def history(self, *, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Champion history, newest first."""
        q = select(champion_history).order_by(champion_history.c.id.desc()).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        with read_tx(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def history_size(self) -> int:
        with read_tx(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(champion_history)).scalar_one())

    def past_champions(self) -> set[str]:
        """Every version that was ever champion (retention keeps them all)."""
        with read_tx(self.engine) as conn:
            return set(conn.execute(select(champion_history.c.version).distinct()).scalars())

    # -- version rows ---------------------------------------------------------------------
    def add(
        self,
        *,
        version: str,
        parent: str | None,
        architecture: str,
        created_at: datetime,
        data_cutoff: int,
        run_id: int | None,
        metrics: Mapping[str, Any] | None,
        manifest_sha256: str,
        classes: Sequence[str] | None = None,
    ) -> bool:
        """Insert a candidate's row; False when the version is registered already."""
        try:
            with write_tx(self.engine) as conn:
                conn.execute(
                    insert(model_versions).values(
                        version=version,
                        parent=parent,
                        architecture=architecture,
                        created_at=created_at,
                        data_cutoff=int(data_cutoff),
                        run_id=run_id,
                        status="candidate",
                        metrics=dict(metrics or {}),
                        manifest_sha256=manifest_sha256,
                        classes=list(classes) if classes is not None else None,
                    )
                )
        except IntegrityError:
            return False
        return True

    def get(self, version: str) -> dict[str, Any] | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(select(model_versions).where(model_versions.c.version == version)).first()
        return dict(row._mapping) if row else None

    def manifest_sha256(self, version: str) -> str | None:
        with read_tx(self.engine) as conn:
            return conn.execute(
                select(model_versions.c.manifest_sha256).where(model_versions.c.version == version)
            ).scalar_one_or_none()

    def set_metrics(self, version: str, metrics: Mapping[str, Any], status: str | None = None) -> None:
        """Record gate metrics (and optionally a status such as "rejected") on a version's row."""
        values: dict[str, Any] = {"metrics": dict(metrics)}
        if status is not None:
            values["status"] = _status(status)
        with write_tx(self.engine) as conn:
            changed = conn.execute(update(model_versions).where(model_versions.c.version == version).values(**values))
            if changed.rowcount == 0:
                raise VersionNotFound(version)

    def mark_deleted(self, versions: Iterable[str]) -> list[str]:
        """Mark versions deleted, except any that is or was champion; returns the ones marked.

        Serialised with :meth:`move`: a version promoted an instant ago is never marked,
        and a version marked here can no longer be promoted, so retention and a promote
        racing for the same version cannot leave a champion without files.
        """
        marked = []
        with write_tx(self.engine) as conn:
            _serialise_moves(conn)
            champions = select(champion_history.c.version)
            for version in versions:
                changed = conn.execute(
                    update(model_versions)
                    .where(
                        model_versions.c.version == version,
                        model_versions.c.status != "deleted",
                        model_versions.c.version.not_in(champions),
                    )
                    .values(status="deleted")
                ).rowcount
                if changed:
                    marked.append(version)
        return marked

    def rows(self) -> list[dict[str, Any]]:
        """Every version row, oldest first."""
        with read_tx(self.engine) as conn:
            rows = conn.execute(select(model_versions).order_by(model_versions.c.created_at, model_versions.c.version))
            return [dict(r._mapping) for r in rows]

    def names(self) -> set[str]:
        with read_tx(self.engine) as conn:
            return set(conn.execute(select(model_versions.c.version)).scalars())


def _serialise_moves(conn: Connection) -> None:
    """One champion move (or retention mark) at a time, cluster-wide, for the rest of this transaction.

    SQLite writers already hold the database's write lock from ``BEGIN IMMEDIATE``.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MOVE_LOCK})


def _champion(conn: Connection) -> Champion | None:
    """The one query that says who the champion is."""
    row = conn.execute(
        select(
            champion_history.c.version,
            champion_history.c.previous,
            champion_history.c.promoted_at,
            champion_history.c.reason,
            champion_history.c.actor,
            champion_history.c.details,
            model_versions.c.architecture,
            model_versions.c.data_cutoff,
            model_versions.c.metrics,
            model_versions.c.classes,
        )
        .join(model_versions, model_versions.c.version == champion_history.c.version)
        .order_by(champion_history.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    m = row._mapping
    return Champion(
        version=m["version"],
        previous=m["previous"],
        promoted_at=m["promoted_at"],
        reason=m["reason"],
        actor=m["actor"] or "",
        details=m["details"],
        architecture=m["architecture"],
        data_cutoff=int(m["data_cutoff"] or 0),
        metrics=m["metrics"],
        classes=tuple(m["classes"]) if m["classes"] is not None else None,
    )


def _status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return status
