"""Restart recovery and the lease holder's sweep: lost runs, a dead holder's lease, a corrupt champion.

Killed at any moment, the service restarts cleanly: a run left active becomes
interrupted, an unfinished version directory goes, and a champion whose files
fail their checksum is replaced (loudly) by the newest intact previous champion.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime

from continual.procutil import process_alive
from continual.registry import ChampionMoved, ChecksumMismatch, VersionNotFound
from continual.service.context import TRAINER_LEASE, ServiceContext
from continual.store.runs import is_request

log = logging.getLogger("continual.service.recovery")

# A pending run nobody asked for and nobody claimed is abandoned after this long.
UNSTARTED_GRACE = 600.0


@dataclass(frozen=True)
class Recovered:
    interrupted: list[int] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    fallback: str | None = None
    freed_lease: str | None = None

    def __bool__(self) -> bool:
        return bool(self.interrupted or self.discarded or self.fallback)


def recover(ctx: ServiceContext) -> Recovered:
    """Runs left active become interrupted, half-written versions go, the champion loads (or an intact one does)."""
    freed = free_lease_of_dead_holder(ctx)
    # Runs left active are ours to interrupt only when no live trainer elsewhere holds the
    # lease (a second process starting must not interrupt the first one's run); otherwise
    # the check job of whoever holds the lease interrupts lost ones (interrupt_lost_runs).
    interrupted = ctx.store.runs.interrupt_all() if ctx.hold_trainer_lease() else []
    discarded = ctx.registry.discard_unfinished()
    for run_id in interrupted:
        log.warning("training run %d was active when the service stopped: marked interrupted", run_id)
    fallback = None
    champion = ctx.store.versions.champion_version()
    if champion is not None:
        try:
            ctx.registry.verify(champion)
        except (ChecksumMismatch, VersionNotFound, OSError) as e:
            fallback = fall_back(ctx, champion, e)
    if ctx.serving is not None:
        ctx.serving.sync(ctx.registry)
    return Recovered(interrupted, discarded, fallback, freed)


def interrupt_lost_runs(ctx: ServiceContext) -> list[int]:
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
    for r in ctx.store.runs.active():
        abandoned = r["host"] or (not is_request(r["trigger"] or "") and _age(r["created_at"], now) > UNSTARTED_GRACE)
        if r["status"] == "pending" and not abandoned:
            continue
        local = r.get("host") == socket.gethostname()
        if local and r.get("pid") and process_alive(int(r["pid"])):
            continue
        if ctx.store.runs.finish(int(r["id"]), "interrupted", error="its trainer or worker is gone"):
            log.warning("training run %d had lost its trainer or worker: marked interrupted", r["id"])
            lost.append(int(r["id"]))
    return lost


def _age(when: datetime, now: datetime) -> float:
    return (now - (when if when.tzinfo else when.replace(tzinfo=UTC))).total_seconds()


def free_lease_of_dead_holder(ctx: ServiceContext) -> str | None:
    """A trainer lease held by a process of this host that is gone (kill -9) is freed now, not after its TTL."""
    holder = ctx.store.leases.holder_of(TRAINER_LEASE)
    host, _, pid = (holder or "").rpartition(":")
    if holder is None or host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    if process_alive(int(pid)):
        return None
    ctx.store.leases.release(TRAINER_LEASE, holder)
    log.warning("freed the trainer lease of %s: that process is gone", holder)
    return holder


def fall_back(ctx: ServiceContext, broken: str, err: Exception) -> str | None:
    """Move the pointer from a corrupt champion to the newest intact earlier one (reason "recovery")."""
    earlier = [h["version"] for h in ctx.store.versions.history()]
    for version in dict.fromkeys(v for v in earlier if v != broken):
        try:
            ctx.registry.verify(version)
        except (ChecksumMismatch, VersionNotFound, OSError):
            continue
        try:
            ctx.registry.promote(
                version, expected=broken, reason="recovery", details={"broken": broken, "error": str(err)}
            )
        except ChampionMoved as moved:  # another process recovered first: its choice stands
            log.warning("champion %s is corrupt, but %s", broken, moved)
            return moved.actual
        log.error(
            "champion %s is corrupt (%s): fell back to %s, the newest intact previous champion", broken, err, version
        )
        ctx.store.records.add_event(
            "champion_fallback",
            f"champion {broken} corrupt; fell back to {version}",
            {"broken": broken, "fallback": version, "error": str(err)},
        )
        return version
    log.error("champion %s is corrupt (%s) and no earlier champion is intact: serving nothing", broken, err)
    ctx.store.records.add_event(
        "champion_fallback", f"champion {broken} corrupt; no intact earlier champion", {"broken": broken}
    )
    return None
