"""The loop: scheduler jobs, triggers, training runs, the gate, promotion, restart recovery.

Jobs are plain functions of a :class:`Loop` (explicit dependencies), so tests call
them without a scheduler; :func:`start` registers each with one line. Nothing is
kept only in memory: the trigger state is recomputed from the store every tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import insert, select

from continual.config import Settings
from continual.gate import Decision, Scores, decide
from continual.learn import runs
from continual.learn.launch import RunHandle, launch_run
from continual.metrics import Metrics
from continual.procutil import process_alive
from continual.registry import ChecksumMismatch, Registry, VersionNotFound
from continual.serving import Serving
from continual.store import Store, StoreUnavailable
from continual.store.engine import read_tx, write_tx
from continual.store.lease import holder_of, release, try_acquire
from continual.store.schema import champion_history, gate_decisions, training_runs

log = logging.getLogger("continual.daemon")

TRAINER_LEASE = "trainer"
# Holdouts are capped (seeded draw) so the gate's cost stays bounded as the store grows.
MAX_HOLDOUT = 5_000


@dataclass
class Loop:
    """Everything the jobs touch. Built once by the service."""

    settings: Settings
    store: Store
    registry: Registry
    metrics: Metrics
    serving: Serving | None = None
    config_path: str | None = None
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stop: threading.Event = field(default_factory=threading.Event)
    handle: RunHandle | None = None

    @property
    def lease_ttl(self) -> float:
        # Renewed every tick and every few seconds during a run; a crashed holder frees it soon.
        return max(30.0, 3 * self.settings.triggers.check_interval_seconds)


# A pending run nobody asked for and nobody claimed is abandoned after this long.
UNSTARTED_GRACE = 600.0


# -- triggers (pure) ------------------------------------------------------------------
@dataclass(frozen=True)
class TriggerInput:
    has_champion: bool
    pending: int
    seconds_since_last_run: float | None
    drift_detected: bool
    requested: bool = False
    # False when the last gated run already saw every sample there is: retraining on
    # the same data would only rebuild the same candidate.
    new_since_last_run: bool = True
    # Runs failed in a row since the last success: the wait before the next one doubles.
    consecutive_failures: int = 0


def trigger_reason(t: TriggerInput, settings: Settings) -> str | None:
    """Why a run should start now, or None. A manual request skips the thresholds (still gated).

    The cooldown (longer after failures, see :func:`runs.failure_backoff`) and the
    "nothing new since the last gated run" rule hold for the bootstrap run too: a
    first candidate rejected by ``min_accuracy`` is not rebuilt from the same data
    every tick.
    """
    trig = settings.triggers
    if t.requested:
        return "manual"
    wait = runs.failure_backoff(t.consecutive_failures, trig)
    if t.seconds_since_last_run is not None and t.seconds_since_last_run < wait:
        return None
    if not t.new_since_last_run:
        return None
    if t.pending < trig.min_new_samples:
        return None
    after = f" (after {t.consecutive_failures} failed runs in a row)" if t.consecutive_failures else ""
    if not t.has_champion:
        return f"bootstrap: {t.pending} samples >= min_new_samples {trig.min_new_samples}{after}"
    if t.drift_detected:
        return f"drift detected with {t.pending} new samples{after}"
    if t.pending >= trig.max_new_samples:
        return f"{t.pending} new samples >= max_new_samples {trig.max_new_samples}{after}"
    if t.seconds_since_last_run is None or t.seconds_since_last_run >= trig.max_interval_seconds:
        return f"{t.pending} new samples and max_interval_seconds {trig.max_interval_seconds:g} passed{after}"
    return None


# -- restart recovery -------------------------------------------------------------------
def recover(loop: Loop) -> dict[str, Any]:
    """Runs left active become interrupted, half-written versions go, the champion loads.

    A champion whose files fail their checksum is replaced (loudly) by the newest
    intact previous champion: the pointer moves, recorded with reason "recovery".
    """
    freed = _free_lease_of_dead_holder(loop)
    # Runs left active are ours to interrupt only when no live trainer elsewhere holds the
    # lease (a second process starting must not interrupt the first one's run); otherwise
    # the check job of whoever holds the lease interrupts lost ones (_interrupt_lost_runs).
    trainer = try_acquire(loop.store, TRAINER_LEASE, loop.holder, loop.lease_ttl)
    interrupted = runs.mark_interrupted_runs(loop.store) if trainer else []
    discarded = loop.registry.discard_unfinished()
    for run_id in interrupted:
        log.warning("training run %d was active when the service stopped: marked interrupted", run_id)
    fallback = None
    champion = loop.registry.champion()
    if champion is not None:
        try:
            loop.registry.verify(champion)
        except (ChecksumMismatch, VersionNotFound, OSError) as e:
            fallback = _fall_back(loop, champion, e)
    if loop.serving is not None:
        loop.serving.sync(loop.registry)
    return {"interrupted": interrupted, "discarded": discarded, "fallback": fallback, "freed_lease": freed}


def _interrupt_lost_runs(loop: Loop) -> list[int]:
    """As the idle lease holder: a run whose worker (or claiming trainer) is gone becomes interrupted.

    A worker on this host is gone when its pid is; one on another host ran for a
    trainer that lost the lease to us. (A live local worker, e.g. ``continual train
    --now``, is left alone.)
    """
    lost = []
    # A claimed run still pending here was claimed by a trainer that is gone: the lease
    # holder (this process, between ticks) has no launch in progress. A pending run that is
    # neither claimed nor a request belongs to a `continual train --now` that never started
    # its worker, once it has waited far longer than a worker takes to start.
    now = datetime.now(UTC)
    for r in runs.active_runs(loop.store):
        abandoned = r["host"] or (
            not runs.is_request(r["trigger"] or "") and _age(r["created_at"], now) > UNSTARTED_GRACE
        )
        if r["status"] == "pending" and not abandoned:
            continue
        local = r.get("host") == socket.gethostname()
        if local and r.get("pid") and process_alive(int(r["pid"])):
            continue
        if runs.finish_run(loop.store, int(r["id"]), "interrupted", error="its trainer or worker is gone"):
            log.warning("training run %d had lost its trainer or worker: marked interrupted", r["id"])
            lost.append(int(r["id"]))
    return lost


def _age(when: datetime, now: datetime) -> float:
    return (now - (when if when.tzinfo else when.replace(tzinfo=UTC))).total_seconds()


def _free_lease_of_dead_holder(loop: Loop) -> str | None:
    """A trainer lease held by a process of this host that is gone (kill -9) is freed now, not after its TTL."""
    holder = holder_of(loop.store, TRAINER_LEASE)
    host, _, pid = (holder or "").rpartition(":")
    if holder is None or host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    if process_alive(int(pid)):
        return None
    release(loop.store, TRAINER_LEASE, holder)
    log.warning("freed the trainer lease of %s: that process is gone", holder)
    return holder


def _fall_back(loop: Loop, broken: str, err: Exception) -> str | None:
    with read_tx(loop.store.engine) as conn:
        earlier = [
            r[0] for r in conn.execute(select(champion_history.c.version).order_by(champion_history.c.id.desc()))
        ]
    for version in dict.fromkeys(v for v in earlier if v != broken):
        try:
            loop.registry.verify(version)
        except (ChecksumMismatch, VersionNotFound, OSError):
            continue
        loop.registry.promote(version, reason="recovery", details={"broken": broken, "error": str(err)})
        log.error(
            "champion %s is corrupt (%s): fell back to %s, the newest intact previous champion", broken, err, version
        )
        loop.store.record_event(
            "champion_fallback",
            f"champion {broken} corrupt; fell back to {version}",
            {"broken": broken, "fallback": version, "error": str(err)},
        )
        return version
    log.error("champion %s is corrupt (%s) and no earlier champion is intact: serving nothing", broken, err)
    loop.store.record_event(
        "champion_fallback", f"champion {broken} corrupt; no intact earlier champion", {"broken": broken}
    )
    return None


# -- the check job ---------------------------------------------------------------------------
def champion_cutoff(loop: Loop) -> tuple[str | None, int]:
    champion = loop.registry.champion()
    return champion, (loop.registry.manifest(champion).data_cutoff if champion else 0)


def check(loop: Loop) -> dict[str, Any]:
    """One tick: lease, pending count, drift, trigger, and (if due) train → gate → promote."""
    m = loop.metrics
    if loop.settings.service.role == "api" or loop.stop.is_set():
        return {"skipped": "role api" if loop.settings.service.role == "api" else "stopping"}
    if not try_acquire(loop.store, TRAINER_LEASE, loop.holder, loop.lease_ttl):
        return {"skipped": "another process holds the trainer lease"}
    m.set_state("checking")
    try:
        if loop.handle is None:
            _interrupt_lost_runs(loop)
        champion, cutoff = champion_cutoff(loop)
        pending = loop.store.count(after=cutoff)
        m.samples_pending.set(pending)
        drift_detected = False
        if champion is not None:
            drift_detected = _drift_check(loop, champion)
            # A cold check (every embedding computed) can outlast the lease's TTL: renew
            # it, and if another process took it meanwhile, leave the training to it.
            if not try_acquire(loop.store, TRAINER_LEASE, loop.holder, loop.lease_ttl):
                return {"skipped": "the trainer lease moved to another process during the drift check"}
        # Only requests: a pending run with another trigger belongs to whoever created it
        # (``continual train --now`` starting its own worker).
        requested = runs.next_request(loop.store)
        last, last_cutoff = _last_run(loop.store)
        failures = runs.consecutive_failures(loop.store)
        m.training_failures_in_a_row.set(failures)
        reason = trigger_reason(
            TriggerInput(
                champion is not None,
                pending,
                last,
                drift_detected,
                requested=requested is not None,
                new_since_last_run=last_cutoff is None or loop.store.max_seq() > last_cutoff,
                consecutive_failures=failures,
            ),
            loop.settings,
        )
        if reason is None:
            return {"pending": pending, "drift": drift_detected, "run": None}
        run_id = int(requested["id"]) if requested else runs.create_run(loop.store, loop.settings, trigger=reason)
        outcome = train_and_gate(loop, run_id)
        return {"pending": pending, "drift": drift_detected, "run": run_id, **outcome}
    finally:
        if not loop.stop.is_set():
            m.set_state("idle")


def _last_run(store: Store) -> tuple[float | None, int | None]:
    """Seconds since the last finished run, and the data cutoff of the last run that was gated."""
    with read_tx(store.engine) as conn:
        last = conn.execute(
            select(training_runs.c.created_at, training_runs.c.finished_at)
            .where(training_runs.c.status.in_(runs.FINISHED))
            .order_by(training_runs.c.id.desc())
            .limit(1)
        ).first()
        gated = conn.execute(
            select(training_runs.c.data_cutoff)
            .where(training_runs.c.status == "succeeded")
            .order_by(training_runs.c.id.desc())
            .limit(1)
        ).scalar_one_or_none()
    if last is None:
        return None, None
    return _age(last.finished_at or last.created_at, datetime.now(UTC)), gated


def _drift_check(loop: Loop, champion: str) -> bool:
    try:
        from continual.drift.check import run_check
    except ImportError:
        return False
    try:
        decision = run_check(
            loop.settings, loop.store, loop.registry, loop.metrics, serving=loop.serving, champion=champion
        )
    except StoreUnavailable:
        raise
    except Exception:  # a failing detector must not stop training triggers or the service
        log.exception("drift check failed")
        return False
    return bool(getattr(decision, "detected", False))


# -- a run: train in a child, then gate ------------------------------------------------------------
def train_and_gate(loop: Loop, run_id: int) -> dict[str, Any]:
    if not runs.claim_run(loop.store, run_id):
        row = runs.get_run(loop.store, run_id)
        log.warning("training run %d is %s and claimed by %s: not starting it", run_id, row["status"], row["host"])
        return {"status": "skipped", "error": f"run {run_id} is {row['status']}, claimed by {row['host']}"}
    m = loop.metrics
    m.set_state("training")
    m.training_runs.inc()
    started = time.monotonic()
    row = _run_child(loop, run_id)
    m.training_duration.observe(time.monotonic() - started)
    if row["status"] == "cancelled":  # by the operator or a shutdown: not a failure of the trainer
        log.warning("training run %d cancelled: %s", run_id, row.get("error"))
        return {"status": "cancelled", "error": row.get("error")}
    if row["status"] != "succeeded" or not row.get("candidate_version"):
        m.training_failures.inc()
        log.error("training run %d %s: %s", run_id, row["status"], row.get("error"))
        return {"status": row["status"], "error": row.get("error")}
    m.last_training_success.set(time.time())
    m.set_state("gating")
    decision = gate(loop, row)
    return {
        "status": "succeeded",
        "candidate": row["candidate_version"],
        "decision": decision.outcome,
        "rule": decision.rule,
    }


def _run_child(loop: Loop, run_id: int) -> dict[str, Any]:
    handle = launch_run(loop.settings, loop.store, run_id, loop.config_path)
    loop.handle = handle
    try:
        while handle.wait(timeout=2.0) is None:
            try:
                try_acquire(loop.store, TRAINER_LEASE, loop.holder, loop.lease_ttl)
            except StoreUnavailable:
                log.warning("could not renew the trainer lease: store unavailable")
            if loop.stop.is_set():
                handle.cancel()
                break
    finally:
        loop.handle = None
    return runs.get_run(loop.store, run_id)


def holdouts(loop: Loop, parent_cutoff: int, data_cutoff: int) -> tuple[np.ndarray, np.ndarray]:
    """Old holdout (at or before the champion's cutoff) and new holdout (after it, up to the candidate's)."""
    seed = loop.settings.training.seed
    old = (
        loop.store.draw(MAX_HOLDOUT, upto=parent_cutoff, split="holdout", seed=seed)
        if parent_cutoff
        else np.empty(0, np.int64)
    )
    new = loop.store.draw(MAX_HOLDOUT, after=parent_cutoff, upto=data_cutoff, split="holdout", seed=seed)
    return old, new


def score(loop: Loop, version: str, old: np.ndarray, new: np.ndarray) -> Scores:
    from continual.learn.evaluate import evaluate, resolve_device

    model = loop.registry.load_model(version, loop.settings)
    device = resolve_device(loop.settings.serving.device)
    model.to(device)
    both = np.concatenate([old, new])
    result = evaluate(model, loop.store, both, loop.settings, device)
    correct = dict(zip(result.seqs.tolist(), (result.predictions == result.labels).tolist(), strict=True))
    return Scores(
        np.array([correct[s] for s in old if s in correct], bool),
        np.array([correct[s] for s in new if s in correct], bool),
    )


def gate(loop: Loop, run: dict[str, Any]) -> Decision:
    """Evaluate candidate and champion on the same holdouts, decide, record, and promote if it passed."""
    candidate = run["candidate_version"]
    parent = run.get("parent_version")
    manifest = loop.registry.manifest(candidate)
    parent_cutoff = loop.registry.manifest(parent).data_cutoff if parent else 0
    old, new = holdouts(loop, parent_cutoff, manifest.data_cutoff)
    cand_scores = score(loop, candidate, old, new)
    champ_scores = score(loop, parent, old, new) if parent else None
    decision = decide(cand_scores, champ_scores, loop.settings.gate)
    current = loop.registry.champion()
    if decision.promote and current != parent:
        decision = Decision(
            "deferred",
            "champion_changed",
            [f"the champion moved from {parent} to {current} during the run; a new run will follow"],
            decision.metrics,
        )
    m = loop.metrics
    if decision.promote:
        # Move the pointer first and record after: a crash in between leaves the
        # promotion in champion_history (with the rule and reasons), never a
        # "promoted" decision whose pointer did not move.
        m.set_state("promoting")
        try:
            loop.registry.promote(
                candidate,
                reason="bootstrap" if parent is None else "gate",
                details={"run_id": run["id"], "rule": decision.rule, "reasons": decision.reasons},
            )
        except (ChecksumMismatch, VersionNotFound, OSError) as e:
            decision = Decision(
                "rejected", "promotion_failed", [*decision.reasons, f"promotion failed: {e}"], decision.metrics
            )
    _record_decision(loop, run["id"], candidate, parent, decision)
    for model, s in (("candidate", cand_scores), ("champion", champ_scores)):
        if s is None:
            continue
        for holdout, acc in (("old", s.old_accuracy), ("new", s.new_accuracy)):
            if acc is not None:
                m.model_accuracy.labels(model=model, holdout=holdout).set(acc)
    loop.registry.set_metrics(
        candidate, decision.metrics, status="rejected" if decision.outcome == "rejected" else None
    )
    if decision.promote:
        m.rejections_in_a_row.set(0)
        m.samples_pending.set(loop.store.count(after=manifest.data_cutoff))
        if loop.serving is not None:
            loop.serving.sync(loop.registry)
        # The new champion's accuracies are the candidate's.
        for holdout, acc in (("old", cand_scores.old_accuracy), ("new", cand_scores.new_accuracy)):
            if acc is not None:
                m.model_accuracy.labels(model="champion", holdout=holdout).set(acc)
    elif decision.outcome == "rejected":
        m.rejections.inc()
        m.rejections_in_a_row.inc()
    log.info("gate: %s %s (rule %s): %s", decision.outcome, candidate, decision.rule, "; ".join(decision.reasons))
    return decision


def _record_decision(loop: Loop, run_id: int, candidate: str, champion: str | None, d: Decision) -> None:
    with write_tx(loop.store.engine) as conn:
        conn.execute(
            insert(gate_decisions).values(
                run_id=run_id,
                candidate=candidate,
                champion=champion,
                outcome=d.outcome,
                rule=d.rule,
                reasons=d.reasons,
                metrics=d.metrics,
                shadow=d.shadow,
                created_at=datetime.now(UTC),
            )
        )
    loop.store.record_event(
        "gate_decision",
        f"{d.outcome} {candidate} ({d.rule})",
        {"run_id": run_id, "candidate": candidate, "champion": champion, "rule": d.rule},
    )


# -- the other jobs ------------------------------------------------------------------------------
def sync_champion(loop: Loop) -> bool:
    """Serving follows the pointer (every process, whatever its role)."""
    if loop.serving is None:
        return False
    changed = loop.serving.sync(loop.registry)
    try:
        _, cutoff = champion_cutoff(loop)
        loop.metrics.samples_pending.set(loop.store.count(after=cutoff))
    except (StoreUnavailable, VersionNotFound):
        pass
    return changed


def retention(loop: Loop, keep_last: int = 10) -> list[str]:
    return loop.registry.apply_retention(keep_last)


# -- the scheduler ----------------------------------------------------------------------------------
def start(loop: Loop) -> BackgroundScheduler:
    """Jobs are re-created at every start (memory job store: nothing pickled)."""
    s = loop.settings
    scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 3600})
    if s.service.role != "api":
        scheduler.add_job(
            _guarded(check),
            "interval",
            args=[loop],
            id="check",
            seconds=s.triggers.check_interval_seconds,
            next_run_time=datetime.now(UTC),
        )
        scheduler.add_job(_guarded(retention), "interval", args=[loop], id="retention", hours=1)
    if loop.serving is not None:
        scheduler.add_job(
            _guarded(sync_champion),
            "interval",
            args=[loop],
            id="sync_champion",
            seconds=s.serving.poll_interval_seconds,
        )
    scheduler.start()
    return scheduler


def stop(loop: Loop, scheduler: BackgroundScheduler | None) -> None:
    """SIGTERM: no new runs, cancel the active one (recorded cancelled), release the lease."""
    loop.stop.set()
    loop.metrics.set_state("stopping")
    handle = loop.handle
    if handle is not None:
        handle.cancel()
    if scheduler is not None:
        scheduler.shutdown(wait=False)
    with contextlib.suppress(StoreUnavailable):
        release(loop.store, TRAINER_LEASE, loop.holder)


def _guarded(job: Any) -> Any:
    def run(loop: Loop) -> Any:
        try:
            return job(loop)
        except StoreUnavailable as e:
            log.warning("%s skipped: %s", job.__name__, e)
        except Exception:  # a job failure is logged and retried next tick, never fatal
            log.exception("%s failed", job.__name__)
            loop.metrics.set_state("degraded")
        return None

    run.__name__ = job.__name__
    return run
