"""Rows of ``training_runs``: create, start, progress, finish, and restart recovery.

Status moves ``pending -> running -> succeeded | failed | cancelled``; a run the
service lost track of (restart, killed worker) becomes ``interrupted``. A finished
run is never moved again, so whichever side records first (the worker or its
parent) wins and the other's write is a no-op.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update

from continual.config import Settings, TriggerSettings
from continual.store import Store
from continual.store.engine import read_tx, write_tx
from continual.store.schema import training_runs

STATUSES = ("pending", "running", "succeeded", "failed", "interrupted", "cancelled")
ACTIVE = ("pending", "running")
FINISHED = ("succeeded", "failed", "interrupted", "cancelled")
# Sections of the settings copied into the run spec; auth and store hold secrets
# and the worker reads them from its own config.
SPEC_SECTIONS = ("service", "model", "training", "ingest")
# The trigger of a run someone asked for (POST /v1/train, `continual train`).
_REQUEST = "manual"


class RunNotFound(KeyError):
    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        super().__init__(f"training run {run_id} does not exist")


class RunNotPending(RuntimeError):
    def __init__(self, run_id: int, status: str) -> None:
        self.run_id, self.status = run_id, status
        super().__init__(f"training run {run_id} is {status!r}, not 'pending'; a run starts once")


def _now() -> datetime:
    return datetime.now(UTC)


def make_spec(settings: Settings, *, trigger: str, seed: int | None = None) -> dict[str, Any]:
    """The run spec: a settings snapshot (without secrets), the seed and the trigger."""
    dumped = settings.model_dump(mode="json")
    if seed is None:
        seed = settings.training.seed
    return {"settings": {k: dumped[k] for k in SPEC_SECTIONS}, "seed": int(seed), "trigger": trigger}


def create_run(
    store: Store, settings: Settings, *, trigger: str, seed: int | None = None, parent: str | None = None
) -> int:
    """Insert a pending run with its spec; returns its id."""
    spec = make_spec(settings, trigger=trigger, seed=seed)
    with write_tx(store.engine) as conn:
        result = conn.execute(
            insert(training_runs).values(
                trigger=trigger, status="pending", created_at=_now(), spec=spec, parent_version=parent
            )
        )
        return int(result.inserted_primary_key[0])


def get_run(store: Store, run_id: int) -> dict[str, Any]:
    with read_tx(store.engine) as conn:
        row = conn.execute(select(training_runs).where(training_runs.c.id == run_id)).first()
    if row is None:
        raise RunNotFound(run_id)
    return dict(row._mapping)


def list_runs(store: Store, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    q = select(training_runs).order_by(training_runs.c.id.desc()).limit(limit)
    if status is not None:
        q = q.where(training_runs.c.status == status)
    with read_tx(store.engine) as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def start_run(store: Store, run_id: int, *, parent: str | None, data_cutoff: int) -> None:
    """pending -> running, recording what fixes the data set: parent version and data cutoff."""
    with write_tx(store.engine) as conn:
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


def claim_run(store: Store, run_id: int) -> bool:
    """A trainer takes a pending run before launching its worker: records its host (``pid`` stays the worker's).

    False when the run is no longer pending or another process claimed it. A claimed
    run that is still pending at a restart had its worker launched (or about to be),
    so recovery interrupts it instead of starting it twice.
    """
    with write_tx(store.engine) as conn:
        result = conn.execute(
            update(training_runs)
            .where(training_runs.c.id == run_id, training_runs.c.status == "pending", training_runs.c.host.is_(None))
            .values(host=socket.gethostname())
        )
        return bool(result.rowcount)


def set_progress(store: Store, run_id: int, progress: dict[str, Any]) -> None:
    with write_tx(store.engine) as conn:
        conn.execute(
            update(training_runs)
            .where(training_runs.c.id == run_id, training_runs.c.status == "running")
            .values(progress=progress)
        )


def finish_run(
    store: Store,
    run_id: int,
    status: str,
    *,
    candidate: str | None = None,
    metrics: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """Record the outcome of an active run; False (and no change) if it had finished already."""
    if status not in FINISHED:
        raise ValueError(f"status must be one of {FINISHED}, got {status!r}")
    values: dict[str, Any] = {"status": status, "finished_at": _now()}
    if candidate is not None:
        values["candidate_version"] = candidate
    if metrics is not None:
        values["metrics"] = metrics
    if error is not None:
        values["error"] = error[:4000]
    with write_tx(store.engine) as conn:
        result = conn.execute(
            update(training_runs)
            .where(training_runs.c.id == run_id, training_runs.c.status.in_(ACTIVE))
            .values(**values)
        )
        return bool(result.rowcount)


def request_run(store: Store, settings: Settings, *, actor: str = "") -> int:
    """A manual request (``POST /v1/train``, ``continual train``): a pending run the trainer picks up (still gated).

    Its trigger starts with "manual" (:func:`is_request`), so it survives a restart.
    """
    return create_run(store, settings, trigger=f"{_REQUEST}{': ' + actor if actor else ''}")


def is_request(trigger: str) -> bool:
    """Whether a run was asked for (:func:`request_run`): the trainer starts it when it can."""
    return trigger == _REQUEST or trigger.startswith(_REQUEST + ":")


def _waiting_request(run: Any) -> bool:
    """A request no trainer has claimed yet (``run``: a row mapping)."""
    return run["status"] == "pending" and run["host"] is None and is_request(run["trigger"] or "")


def active_runs(store: Store) -> list[dict[str, Any]]:
    """Pending and running runs, oldest first."""
    q = select(training_runs).where(training_runs.c.status.in_(ACTIVE)).order_by(training_runs.c.id)
    with read_tx(store.engine) as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def next_request(store: Store) -> dict[str, Any] | None:
    """The oldest request no trainer has claimed, or None."""
    return next((r for r in active_runs(store) if _waiting_request(r)), None)


def mark_interrupted_runs(store: Store, *, reason: str = "the service restarted while the run was active") -> list[int]:
    """Restart recovery: every active run becomes interrupted, except unclaimed requests. Returns their ids.

    A pending *request* that no trainer claimed (:func:`claim_run`) was never
    started, so nothing of it was lost: it stays pending and the trainer starts it
    at its next check (a run requested while the service was stopped runs once it
    is back).
    """
    with write_tx(store.engine) as conn:
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


# Backoff: a run that keeps failing (a sample that crashes decoding, a device that
# runs out of memory) is retried after cooldown, then 2x, 4x, ... of it, never
# more than max_interval_seconds apart: a broken trainer does not spin.
_MAX_DOUBLINGS = 30


def consecutive_failures(store: Store, *, look_back: int = 64) -> int:
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
    with read_tx(store.engine) as conn:
        for status, error in conn.execute(q):
            if status == "succeeded":
                break
            n += status == "failed" and not (error or "").startswith("NothingToTrain")
    return n


def failure_backoff(failures: int, triggers: TriggerSettings) -> float:
    """Seconds to wait after the last run before the next automatic one, given the failures in a row.

    No failure: the configured cooldown. After k >= 1 failures: ``base * 2**(k-1)`` with
    ``base = max(cooldown, check interval)`` (a zero cooldown still backs off), capped at
    ``max(max_interval_seconds, cooldown)``.
    """
    if failures <= 0:
        return triggers.cooldown_seconds
    base = max(triggers.cooldown_seconds, triggers.check_interval_seconds)
    cap = max(triggers.max_interval_seconds, triggers.cooldown_seconds)
    return min(base * 2.0 ** min(failures - 1, _MAX_DOUBLINGS), cap)
