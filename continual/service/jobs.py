"""The scheduler's jobs: plain functions of a :class:`ServiceContext`, each registered with one line.

- :func:`check` (every ``check_interval_seconds``, trainer roles): lease, pending
  count, drift check, trigger, and — when one fires — train → gate → promote.
- :func:`sync_champion` (every ``poll_interval_seconds``, serving roles): follow the pointer.
- :func:`accuracy` (every ``[accuracy] interval_seconds``, trainer roles): close windows of the
  champion's logged predictions with their label-free estimates, score windows and versions
  against the labels that arrived, mirror it all into the metrics.
- :func:`retention` (hourly, trainer roles): prune model versions, the prediction log, the event
  log, drift checks, and old runs' settings snapshots and worker logs.

Nothing is kept only in memory: the trigger state is recomputed from the store every tick.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from apscheduler.schedulers.background import BackgroundScheduler

from continual.drift.check import DriftDecision, run_check
from continual.learn.classes import new_class_counts
from continual.learn.run import create_run
from continual.metrics import Metrics
from continual.registry import VersionNotFound
from continual.service import recovery
from continual.service.accuracy import accuracy
from continual.service.context import TRAINER_LEASE, ServiceContext
from continual.service.trainer import train_and_gate
from continual.store import Champion, StoreUnavailable
from continual.triggers import TriggerInput, estimate_low, labels_needed, pick_estimate, trigger_reason

log = logging.getLogger("continual.service.jobs")

T = TypeVar("T")


def check(ctx: ServiceContext) -> dict[str, Any]:
    """One tick: lease, pending count, drift, trigger, and (if due) train → gate → promote."""
    role = ctx.settings.service.role
    if role == "api" or ctx.stop.is_set():
        return {"skipped": "role api" if role == "api" else "stopping"}
    if not ctx.hold_trainer_lease():
        return {"skipped": "another process holds the trainer lease"}
    ctx.state.set("checking")
    try:
        if ctx.handle is None:
            recovery.interrupt_lost_runs(ctx)
        champion = ctx.store.versions.champion()
        pending = ctx.store.count(after=champion.data_cutoff if champion else 0)
        ctx.metrics.samples_pending.set(pending)
        drift_detected = False
        if champion is not None:
            drift_detected = _drift_check(ctx, champion.version)
            # A cold check (every embedding computed) can outlast the lease's TTL: renew
            # it, and if another process took it meanwhile, leave the training to it.
            if not ctx.hold_trainer_lease():
                return {"skipped": "the trainer lease moved to another process during the drift check"}
        # Only requests: a pending run with another trigger belongs to whoever created it
        # (``continual train --now`` starting its own worker).
        requested = ctx.store.runs.next_request()
        failures = ctx.store.runs.consecutive_failures()
        ctx.metrics.training_failures_in_a_row.set(failures)
        last_cutoff = ctx.store.runs.last_gated_cutoff()
        window = ctx.store.predictions.last_window(champion.version) if champion is not None else None
        estimate = pick_estimate(window["estimates"], ctx.settings.accuracy.estimator) if window else None
        inputs = TriggerInput(
            champion is not None,
            pending,
            _seconds_since(ctx.store.runs.last_finished_at()),
            drift_detected,
            requested=requested is not None,
            new_since_last_run=last_cutoff is None or ctx.store.max_seq() > last_cutoff,
            consecutive_failures=failures,
            estimated_accuracy=estimate,
            new_classes=new_classes(ctx, champion),
        )
        ctx.metrics.labels_needed.set(labels_needed(inputs, ctx.settings.triggers))
        if window is not None and estimate is not None and estimate_low(estimate, ctx.settings.triggers):
            _record_low_estimate(ctx, window, estimate, pending)
        reason = trigger_reason(inputs, ctx.settings.triggers)
        if reason is None:
            return {"pending": pending, "drift": drift_detected, "run": None}
        run_id = int(requested["id"]) if requested else create_run(ctx.store, ctx.settings, trigger=reason)
        outcome = train_and_gate(ctx, run_id)
        return {"pending": pending, "drift": drift_detected, "run": run_id, **outcome.to_dict()}
    finally:
        if not ctx.stop.is_set():
            ctx.state.set("idle")


def new_classes(ctx: ServiceContext, champion: Champion | None) -> tuple[tuple[str, int, int], ...]:
    """(label, train, holdout) of each class with samples that the champion lacks and the policy lets in.

    Also mirrors every class's sample count in ``continual_class_samples{label}``.
    """
    rows = ctx.store.classes.rows(ctx.settings.model.classes)
    ctx.metrics.set_class_samples({r.label: r.samples for r in rows}, limit=ctx.settings.model.most_classes)
    if champion is None:
        return ()
    have = champion.classes if champion.classes is not None else ctx.registry.manifest(champion.version).classes
    return tuple((c.label, c.train, c.holdout) for c in new_class_counts(have, rows, ctx.settings))


def _seconds_since(when: datetime | None) -> float | None:
    return None if when is None else (datetime.now(UTC) - when).total_seconds()


LOW_ESTIMATE_EVENT = "estimated_accuracy_low"


def _record_low_estimate(ctx: ServiceContext, window: dict[str, Any], estimate: float, pending: int) -> None:
    """One event per window whose estimate is below ``min_estimated_accuracy`` (the trigger may start a run)."""
    last = ctx.store.records.events(kind=LOW_ESTIMATE_EVENT, limit=1)
    if last and (last[0]["data"] or {}).get("window_id") == window["id"]:
        return
    trig = ctx.settings.triggers
    needed = max(0, trig.min_new_samples - pending)
    ctx.store.records.add_event(
        LOW_ESTIMATE_EVENT,
        f"estimated accuracy {estimate:.3f} ({ctx.settings.accuracy.estimator}) of {window['model_version']} < "
        f"min_estimated_accuracy {trig.min_estimated_accuracy:g} over {window['n']} predictions; "
        + (f"{needed} more labeled samples needed for a run" if needed else f"{pending} new samples: a run may start"),
        {"window_id": window["id"], "version": window["model_version"], "estimate": estimate,
         "estimates": window["estimates"], "flags": window["flags"], "pending": pending, "labels_needed": needed},
    )  # fmt: skip


def _drift_check(ctx: ServiceContext, champion: str) -> bool:
    serving = ctx.serving
    try:
        decision = run_check(
            ctx.settings,
            ctx.store,
            ctx.registry,
            champion=champion,
            cache=ctx.drift_cache,
            live=serving.live if serving is not None else None,
            predictions=serving.reservoir_snapshot() if serving is not None else None,
        )
    except StoreUnavailable:
        raise
    except Exception:  # a failing detector must not stop training triggers or the service
        log.exception("drift check failed")
        return False
    if decision.check_id is not None:
        mirror_drift(ctx.metrics, decision)
    return decision.detected


def mirror_drift(metrics: Metrics, decision: DriftDecision) -> None:
    """A recorded check's outcome in ``continual_drift_*``."""
    for r in decision.results:
        metrics.set_drift(r.detector, effect=r.effect, p_value=r.p_value, detected=r.detected)
    for name in decision.skipped:
        # A detector that could not run reports no drift rather than a stale alarm.
        metrics.set_drift(name, effect=None, p_value=None, detected=False)
    for window, stats in (decision.text or {}).items():
        metrics.set_text_drift(window, unknown_rate=stats["unknown_token_rate"], mean_tokens=stats["mean_tokens"])
    metrics.drift_checked()


def sync_champion(ctx: ServiceContext) -> bool:
    """Serving follows the pointer (every process, whatever its role)."""
    if ctx.serving is None:
        return False
    changed = ctx.serving.sync(ctx.registry)
    try:
        champion = ctx.store.versions.champion()
        ctx.metrics.samples_pending.set(ctx.store.count(after=champion.data_cutoff if champion else 0))
    except (StoreUnavailable, VersionNotFound):
        pass
    return changed


@dataclass(frozen=True)
class Pruned:
    versions: list[str]
    predictions: int
    events: int
    drift_checks: int
    run_specs: int
    run_logs: list[str]


def retention(ctx: ServiceContext) -> Pruned:
    """Keep what grows bounded: model versions (``[model] keep_versions``; every past champion stays),
    logged predictions (``[serving] prediction_retention_days``/``_rows``), the event log, drift
    checks, old runs' settings snapshots and worker logs (``[retention]``)."""
    r, s = ctx.settings.retention, ctx.settings.serving
    pruned = Pruned(
        versions=ctx.registry.apply_retention(ctx.settings.model.keep_versions),
        predictions=ctx.store.predictions.apply_retention(
            max_age_seconds=s.prediction_retention_days * 86_400, max_rows=s.prediction_retention_rows
        ),
        events=ctx.store.records.prune_events(older_than_days=r.events_days, keep_rows=r.events_max_rows),
        drift_checks=ctx.store.records.prune_drift_checks(
            older_than_days=r.drift_checks_days, keep_rows=r.drift_checks_max_rows
        ),
        run_specs=len(ctx.store.runs.prune_specs(older_than_days=r.run_specs_days)),
        run_logs=_prune_run_logs(ctx.settings.service.data_dir / "runs", r.run_logs_days),
    )
    if any(
        (pruned.versions, pruned.predictions, pruned.events, pruned.drift_checks, pruned.run_specs, pruned.run_logs)
    ):
        log.info("retention: %s", pruned)
    return pruned


def _prune_run_logs(directory: Path, older_than_days: float) -> list[str]:
    """Worker logs (``<id>.log``) not written to for ``older_than_days``."""
    if not directory.is_dir():
        return []
    cutoff = time.time() - older_than_days * 86_400
    gone = []
    for path in sorted(directory.glob("*.log")):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                gone.append(path.name)
    return gone


# -- the scheduler ----------------------------------------------------------------------------------
def start(ctx: ServiceContext) -> BackgroundScheduler:
    """Jobs are re-created at every start (memory job store: nothing pickled)."""
    s = ctx.settings
    scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 3600})
    every = scheduler.add_job
    if s.service.role != "api":
        every(_guarded(check, ctx), "interval", id="check", seconds=s.triggers.check_interval_seconds,
              next_run_time=datetime.now(UTC))  # fmt: skip
        every(_guarded(retention, ctx), "interval", id="retention", hours=1)
        every(_guarded(accuracy, ctx), "interval", id="accuracy", seconds=s.accuracy.interval_seconds)
    if ctx.serving is not None:
        every(_guarded(sync_champion, ctx), "interval", id="sync_champion", seconds=s.serving.poll_interval_seconds)
    scheduler.start()
    return scheduler


def stop(ctx: ServiceContext, scheduler: BackgroundScheduler | None) -> None:
    """SIGTERM: no new runs, cancel the active one (recorded cancelled), release the lease."""
    ctx.stop.set()
    ctx.state.set("stopping")
    handle = ctx.handle
    if handle is not None:
        handle.cancel()
    if scheduler is not None:
        scheduler.shutdown(wait=False)
    if ctx.serving is not None and ctx.serving.log is not None:
        # Write what the log holds now; requests still draining add to it, and serve() stops
        # the writer (a last write) once the HTTP server is done.
        ctx.serving.log.flush(timeout=5.0)
    with contextlib.suppress(StoreUnavailable):
        ctx.store.leases.release(TRAINER_LEASE, ctx.holder)


def _guarded(job: Callable[[ServiceContext], T], ctx: ServiceContext) -> Callable[[], T | None]:
    def run() -> T | None:
        try:
            return job(ctx)
        except StoreUnavailable as e:
            log.warning("%s skipped: %s", job.__name__, e)
        except Exception:  # a job failure is logged and retried next tick, never fatal
            log.exception("%s failed", job.__name__)
            ctx.state.set("degraded")
        return None

    run.__name__ = job.__name__
    return run
