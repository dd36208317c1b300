"""One run from the trainer's side: claim it, train it in a child process, gate the candidate, promote it.

The worker (``continual.service.worker``) records its own outcome; this side only
waits for it (renewing the trainer lease), then hands the candidate to the gate
(:func:`continual.gate.evaluate`) and moves the champion pointer by
compare-and-swap from the parent the candidate was trained from. A rollback or
promotion that lands while the gate evaluates wins: the candidate is deferred.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from continual import gate
from continual.gate import Decision, Scores
from continual.learn.launch import launch_run
from continual.registry import ChampionMoved, ChecksumMismatch, VersionNotFound
from continual.service.context import ServiceContext
from continual.store import StoreUnavailable

log = logging.getLogger("continual.service.trainer")


@dataclass(frozen=True)
class RunOutcome:
    status: str  # succeeded | failed | interrupted | cancelled | skipped
    candidate: str | None = None
    decision: Decision | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.candidate is not None:
            out["candidate"] = self.candidate
        if self.decision is not None:
            out["decision"], out["rule"] = self.decision.outcome, self.decision.rule
        if self.error is not None:
            out["error"] = self.error
        return out


def train_and_gate(ctx: ServiceContext, run_id: int) -> RunOutcome:
    """Claim the pending run, train it in a child process, and gate its candidate."""
    if not ctx.store.runs.claim(run_id):
        row = ctx.store.runs.get(run_id)
        log.warning("training run %d is %s and claimed by %s: not starting it", run_id, row["status"], row["host"])
        return RunOutcome("skipped", error=f"run {run_id} is {row['status']}, claimed by {row['host']}")
    m = ctx.metrics
    ctx.state.set("training")
    m.training_runs.inc()
    started = time.monotonic()
    row = _run_child(ctx, run_id)
    m.training_duration.observe(time.monotonic() - started)
    if row["status"] == "cancelled":  # by the operator or a shutdown: not a failure of the trainer
        log.warning("training run %d cancelled: %s", run_id, row.get("error"))
        return RunOutcome("cancelled", error=row.get("error"))
    if row["status"] != "succeeded" or not row.get("candidate_version"):
        m.training_failures.inc()
        log.error("training run %d %s: %s", run_id, row["status"], row.get("error"))
        return RunOutcome(row["status"], error=row.get("error"))
    m.last_training_success.set(time.time())
    ctx.state.set("gating")
    decision = gate_run(ctx, run_id, row["candidate_version"], row.get("parent_version"))
    return RunOutcome("succeeded", candidate=row["candidate_version"], decision=decision)


def _run_child(ctx: ServiceContext, run_id: int) -> dict[str, Any]:
    handle = launch_run(ctx.settings, ctx.store, run_id, ctx.config_path)
    ctx.handle = handle
    try:
        while handle.wait(timeout=2.0) is None:
            try:
                ctx.hold_trainer_lease()
            except StoreUnavailable:
                log.warning("could not renew the trainer lease: store unavailable")
            if ctx.stop.is_set():
                handle.cancel()
                break
    finally:
        ctx.handle = None
    return ctx.store.runs.get(run_id)


def gate_run(ctx: ServiceContext, run_id: int, candidate: str, parent: str | None) -> Decision:
    """Evaluate the candidate against its parent, promote it if it passed, record the decision either way."""
    evaluation = gate.evaluate(ctx.store, ctx.registry, ctx.settings, candidate, parent)
    decision = evaluation.decision
    if decision.promote:
        # Move the pointer first and record after: a crash in between leaves the
        # promotion in champion_history (with the rule and reasons), never a
        # "promoted" decision whose pointer did not move.
        ctx.state.set("promoting")
        decision = _promote(ctx, run_id, candidate, parent, decision)
    ctx.store.records.add_decision(
        run_id=run_id,
        candidate=candidate,
        champion=parent,
        outcome=decision.outcome,
        rule=decision.rule,
        reasons=decision.reasons,
        metrics=decision.metrics,
        shadow=decision.shadow,
    )
    _mirror(ctx, evaluation.candidate, evaluation.champion, decision)
    ctx.store.versions.set_metrics(
        candidate, decision.metrics, status="rejected" if decision.outcome == "rejected" else None
    )
    if decision.promote and ctx.serving is not None:
        ctx.serving.sync(ctx.registry)
    log.info("gate: %s %s (rule %s): %s", decision.outcome, candidate, decision.rule, "; ".join(decision.reasons))
    return decision


def _promote(ctx: ServiceContext, run_id: int, candidate: str, parent: str | None, decision: Decision) -> Decision:
    try:
        ctx.registry.promote(
            candidate,
            expected=parent,
            reason="bootstrap" if parent is None else "gate",
            details={"run_id": run_id, "rule": decision.rule, "reasons": decision.reasons},
        )
    except ChampionMoved as e:
        return Decision(
            "deferred",
            "champion_changed",
            [
                *decision.reasons,
                f"the champion moved from {parent} to {e.actual} during the run; a new run will follow",
            ],
            decision.metrics,
        )
    except (ChecksumMismatch, VersionNotFound, OSError) as e:
        return Decision("rejected", "promotion_failed", [*decision.reasons, f"promotion failed: {e}"], decision.metrics)
    ctx.metrics.promotions.inc()
    return decision


def _mirror(ctx: ServiceContext, cand: Scores, champ: Scores | None, decision: Decision) -> None:
    m = ctx.metrics
    for model, s in (("candidate", cand), ("champion", champ)):
        if s is None:
            continue
        for holdout, acc in (("old", s.old_accuracy), ("new", s.new_accuracy)):
            if acc is not None:
                m.model_accuracy.labels(model=model, holdout=holdout).set(acc)
    if decision.promote:
        m.rejections_in_a_row.set(0)
        champion = ctx.store.versions.champion()
        if champion is not None:
            m.samples_pending.set(ctx.store.count(after=champion.data_cutoff))
        # The new champion's accuracies are the candidate's.
        for holdout, acc in (("old", cand.old_accuracy), ("new", cand.new_accuracy)):
            if acc is not None:
                m.model_accuracy.labels(model="champion", holdout=holdout).set(acc)
    elif decision.outcome == "rejected":
        m.rejections.inc()
        m.rejections_in_a_row.inc()
