"""Rows of ``training_runs``: create, claim, start, progress, finish, and what recovery and triggers ask of them.

Status moves ``pending -> running -> succeeded | failed | cancelled``; a run the
service lost track of (restart, killed worker) becomes ``interrupted``. A finished
run is never moved again, so whichever side records first wins and the other's
write is a no-op. Who writes what:

- the worker (``continual.learn.run``): ``start``, ``set_progress``, ``finish``;
- its launcher (``continual.learn.launch.RunHandle``): ``finish`` only when the worker
  died without recording (killed, crashed before it could);
- restart recovery and the trainer's sweep (``continual.service.recovery``): ``finish(..., "interrupted")``;
- an operator (``continual train --cancel``): ``finish(..., "cancelled")`` of a run not yet started.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from continual.store.engine import read_tx, write_tx
from continual.store.schema import training_runs

STATUSES = ("pending", "running", "succeeded", "failed", "interrupted", "cancelled")
ACTIVE = ("pending", "running")
FINISHED = ("succeeded", "failed", "interrupted", "cancelled")
# The trigger of a run someone asked for (POST /v1/train, `continual train`).
REQUEST = "manual"
# A failed run whose error starts with this found nothing to train on: the trainer did not fail.
NOTHING_TO_TRAIN = "NothingToTrain"


class RunNotFound(KeyError):
    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        super().__init__(f"training run {run_id} does not exist")

    def __str__(self) -> str:
        return str(self.args[0])


class RunNotPending(RuntimeError):
    def __init__(self, run_id: int, status: str) -> None:
        self.run_id, self.status = run_id, status
        super().__init__(f"training run {run_id} is {status!r}, not 'pending'; a run starts once")


class RunActive(RuntimeError):
    """A run was asked for while another is pending or running (one run at a time)."""

    def __init__(self, run_id: int, status: str) -> None:
        self.run_id, self.status = run_id, status
        super().__init__(f"training run {run_id} is already {status}")


def is_request(trigger: str) -> bool:
    """Whether a run was asked for (POST /v1/train, ``continual train``): the trainer starts it when it can."""
    return trigger == REQUEST or trigger.startswith(REQUEST + ":")


def _waiting_request(run: Mapping[str, Any]) -> bool:
    """A request no trainer has claimed yet."""
    return run["status"] == "pending" and run["host"] is None and is_request(run["trigger"] or "")


def _now() -> datetime:
    return datetime.now(UTC)


class Runs:
    """``training_runs``; bound to one engine (``store.runs``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, trigger: str, spec: Mapping[str, Any], parent: str | None = None) -> int:
        """Insert a pending run with its spec (the settings snapshot); returns its id."""
        with write_tx(self.engine) as conn:
            result = conn.execute(
                insert(training_runs).values(
                    trigger=trigger, status="pending", created_at=_now(), spec=dict(spec), parent_version=parent
                )
            )
            return int(result.inserted_primary_key[0])

    def get(self, run_id: int) -> dict[str, Any]:
        with read_tx(self.engine) as conn:
            row = conn.execute(select(training_runs).where(training_runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        return dict(row._mapping)

    def recent(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Runs newest first."""
        q = select(training_runs).order_by(training_runs.c.id.desc()).limit(limit)
        if status is not None:
            q = q.where(training_runs.c.status == status)
        with read_tx(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def active(self) -> list[dict[str, Any]]:
        """Pending and running runs, oldest first."""
        q = select(training_runs).where(training_runs.c.status.in_(ACTIVE)).order_by(training_runs.c.id)
        with read_tx(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def next_request(self) -> dict[str, Any] | None:
        """The oldest request no trainer has claimed, or None."""
        return next((r for r in self.active() if _waiting_request(r)), None)

    def claim(self, run_id: int) -> bool:
        """A trainer takes a pending run before launching its worker: records its host (``pid`` stays the worker's).

        False when the run is no longer pending or another process claimed it. A claimed
        run that is still pending at a restart had its worker launched (or about to be),
        so recovery interrupts it instead of starting it twice.
        """
        with write_tx(self.engine) as conn:
            result = conn.execute(
                update(training_runs)
                .where(
                    training_runs.c.id == run_id, training_runs.c.status == "pending", training_runs.c.host.is_(None)
                )
                .values(host=socket.gethostname())
            )
            return bool(result.rowcount)

    def start(self, run_id: int, *, parent: str | None, data_cutoff: int) -> None:
        """pending -> running, recording what fixes the data set (parent version, data cutoff) and this process."""
        with write_tx(self.engine) as conn:
            row = conn.execute(select(training_runs.c.status).where(training_runs.c.id == run_id)).first()
            if row is None:
                raise RunNotFound(run_id)
            if row.status != "pending":
                raise RunNotPending(run_id, row.status)
            conn.execute(
                update(training_runs)
                .where(training_runs.c.id == run_id)
                .values(
                    status="running",
                    started_at=_now(),
                    parent_version=parent,
                    data_cutoff=int(data_cutoff),
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    progress={"phase": "starting"},
                )
            )

    def set_progress(self, run_id: int, progress: Mapping[str, Any]) -> None:
        with write_tx(self.engine) as conn:
            conn.execute(
                update(training_runs)
                .where(training_runs.c.id == run_id, training_runs.c.status == "running")
                .values(progress=dict(progress))
            )

    def finish(
        self,
        run_id: int,
        status: str,
        *,
        candidate: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the outcome of an active run; False (and no change) if it had finished already."""
        if status not in FINISHED:
            raise ValueError(f"status must be one of {FINISHED}, got {status!r}")
        values: dict[str, Any] = {"status": status, "finished_at": _now()}
        if candidate is not None:
            values["candidate_version"] = candidate
        if metrics is not None:
            values["metrics"] = dict(metrics)
        if error is not None:
            values["error"] = error[:4000]
        with write_tx(self.engine) as conn:
            result = conn.execute(
                update(training_runs)
                .where(training_runs.c.id == run_id, training_runs.c.status.in_(ACTIVE))
                .values(**values)
            )
            return bool(result.rowcount)

    def interrupt_all(self, *, reason: str = "the service restarted while the run was active") -> list[int]:
        """Restart recovery: every active run becomes interrupted, except unclaimed requests. Returns their ids.

        A pending *request* that no trainer claimed was never started, so nothing of it
        was lost: it stays pending and the trainer starts it at its next check (a run
        requested while the service was stopped runs once it is back).
        """
        with write_tx(self.engine) as conn:
            rows = conn.execute(
                select(training_runs.c.id, training_runs.c.status, training_runs.c.trigger, training_runs.c.host).where(
                    training_runs.c.status.in_(ACTIVE)
                )
            ).all()
            ids = [int(r.id) for r in rows if not _waiting_request(r._mapping)]
            if ids:
                conn.execute(
                    update(training_runs)
                    .where(training_runs.c.id.in_(ids), training_runs.c.status.in_(ACTIVE))
                    .values(status="interrupted", finished_at=_now(), error=reason)
                )
        return ids

    def consecutive_failures(self, *, look_back: int = 64) -> int:
        """How many runs failed since the last one that succeeded.

        Interrupted and cancelled runs do not count, nor does a run that found nothing
        new to train on (``NothingToTrain``, a manual request too early): the trainer
        did not fail there.
        """
        q = (
            select(training_runs.c.status, training_runs.c.error)
            .where(training_runs.c.status.in_(FINISHED))
            .order_by(training_runs.c.id.desc())
            .limit(look_back)
        )
        n = 0
        with read_tx(self.engine) as conn:
            for status, error in conn.execute(q):
                if status == "succeeded":
                    break
                n += status == "failed" and not (error or "").startswith(NOTHING_TO_TRAIN)
        return n

    def last_finished_at(self) -> datetime | None:
        """When the newest finished run ended (its creation time if it never recorded an end)."""
        with read_tx(self.engine) as conn:
            row = conn.execute(
                select(training_runs.c.created_at, training_runs.c.finished_at)
                .where(training_runs.c.status.in_(FINISHED))
                .order_by(training_runs.c.id.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        when: datetime = row.finished_at or row.created_at
        return when if when.tzinfo else when.replace(tzinfo=UTC)

    def last_gated_cutoff(self) -> int | None:
        """The data cutoff of the newest run that succeeded (its candidate went to the gate)."""
        with read_tx(self.engine) as conn:
            cutoff = conn.execute(
                select(training_runs.c.data_cutoff)
                .where(training_runs.c.status == "succeeded")
                .order_by(training_runs.c.id.desc())
                .limit(1)
            ).scalar_one_or_none()
        return None if cutoff is None else int(cutoff)
