"""The audit trail: gate decisions, drift checks and the event log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, insert, select

from continual.store.engine import read_tx, write_tx
from continual.store.schema import drift_checks, events, gate_decisions

OUTCOMES = ("promoted", "rejected", "deferred")


class Records:
    """``gate_decisions``, ``drift_checks`` and ``events``; bound to one engine (``store.records``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- gate decisions --------------------------------------------------------------------
    def add_decision(
        self,
        *,
        run_id: int | None,
        candidate: str,
        champion: str | None,
        outcome: str,
        rule: str,
        reasons: Sequence[str],
        metrics: Mapping[str, Any],
        shadow: bool = False,
    ) -> int:
        """The gate's decision and its ``gate_decision`` event, in one transaction."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with write_tx(self.engine) as conn:
            result = conn.execute(
                insert(gate_decisions).values(
                    run_id=run_id,
                    candidate=candidate,
                    champion=champion,
                    outcome=outcome,
                    rule=rule,
                    reasons=list(reasons),
                    metrics=dict(metrics),
                    shadow=shadow,
                    created_at=datetime.now(UTC),
                )
            )
            _event(
                conn,
                "gate_decision",
                f"{outcome} {candidate} ({rule})",
                {"run_id": run_id, "candidate": candidate, "champion": champion, "rule": rule},
            )
            return int(result.inserted_primary_key[0])

    def decision_for_run(self, run_id: int) -> dict[str, Any] | None:
        """The gate's newest decision on a run's candidate, or None while there is none."""
        with read_tx(self.engine) as conn:
            row = conn.execute(
                select(gate_decisions).where(gate_decisions.c.run_id == run_id).order_by(gate_decisions.c.id.desc())
            ).first()
        return dict(row._mapping) if row else None

    def last_decision(self) -> dict[str, Any] | None:
        return self._newest(gate_decisions)

    def decisions(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Gate decisions, oldest first (the newest ``limit`` when given)."""
        return self._oldest_first(gate_decisions, limit)

    # -- drift checks ------------------------------------------------------------------------
    def add_drift_check(
        self,
        *,
        champion: str | None,
        detected: bool,
        n_reference: int,
        n_current: int,
        duration_seconds: float,
        results: Mapping[str, Any],
    ) -> int:
        with write_tx(self.engine) as conn:
            result = conn.execute(
                insert(drift_checks).values(
                    created_at=datetime.now(UTC),
                    champion=champion,
                    detected=detected,
                    n_reference=n_reference,
                    n_current=n_current,
                    duration_seconds=duration_seconds,
                    results=dict(results),
                )
            )
            return int(result.inserted_primary_key[0])

    def last_drift_check(self) -> dict[str, Any] | None:
        return self._newest(drift_checks)

    def drift_checks(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Drift checks, oldest first (the newest ``limit`` when given)."""
        return self._oldest_first(drift_checks, limit)

    # -- events -----------------------------------------------------------------------------------
    def add_event(self, kind: str, message: str, data: Mapping[str, Any] | None = None) -> None:
        with write_tx(self.engine) as conn:
            _event(conn, kind, message, data)

    def events(self, *, limit: int = 50, kind: str | None = None) -> list[dict[str, Any]]:
        """The newest events first."""
        q = select(events).order_by(events.c.id.desc()).limit(limit)
        if kind:
            q = q.where(events.c.kind == kind)
        with read_tx(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    # -- helpers -----------------------------------------------------------------------------------
    def _newest(self, table: Table) -> dict[str, Any] | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(select(table).order_by(table.c.id.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def _oldest_first(self, table: Table, limit: int | None) -> list[dict[str, Any]]:
        q = select(table).order_by(table.c.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with read_tx(self.engine) as conn:
            return [dict(r._mapping) for r in reversed(conn.execute(q).all())]


def _event(conn: Connection, kind: str, message: str, data: Mapping[str, Any] | None) -> None:
    conn.execute(
        insert(events).values(
            created_at=datetime.now(UTC), kind=kind, message=message, data=dict(data) if data is not None else None
        )
    )
