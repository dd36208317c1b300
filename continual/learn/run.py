"""A training run's life: its spec, then start → progress → finish on its row.

A run is created with a *spec*: a snapshot of the settings that shape training
(``service``, ``model``, ``training``, ``ingest``, ``triggers``), the seed and the trigger. The
worker trains from that snapshot alone; only the store connection (and its
secrets) comes from the worker's own process, so a config edited after the
request never changes a run already asked for. :func:`execute_run` is the
worker's whole job (``continual.service.worker`` is its process): fix the data
set, build the candidate (:mod:`continual.learn.candidate`) and record the
outcome. Every training failure ends up as ``failed`` or ``cancelled`` on the row.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch

from continual.config import Settings, StoreSettings, settings_from_dict
from continual.learn.candidate import VersionFiles, build_candidate
from continual.learn.dist import Dist
from continual.learn.train import Cancelled, TimeBudgetExceeded
from continual.store import Store
from continual.store.runs import REQUEST, RunActive, RunNotPending

log = logging.getLogger("continual.learn.run")

# Test hook: the worker hangs (ignoring SIGTERM, as a stuck C call would) when it reports this phase.
HANG_ENV = "CONTINUAL_TEST_HANG_AT"

# Sections of the settings copied into the run spec ("adaptation": the target data of [training] adaptation); auth and store hold secrets
# and the worker takes the store connection from its own process. "triggers" holds
# when a new class is ready to join the model (min_class_samples, min_class_holdout).
SPEC_SECTIONS = ("service", "model", "training", "ingest", "triggers", "adaptation")


def make_spec(settings: Settings, *, trigger: str, seed: int | None = None) -> dict[str, Any]:
    """The run spec: a settings snapshot (without secrets), the seed and the trigger."""
    dumped = settings.model_dump(mode="json")
    if seed is None:
        seed = settings.training.seed
    return {"settings": {k: dumped[k] for k in SPEC_SECTIONS}, "seed": int(seed), "trigger": trigger}


def create_run(
    store: Store, settings: Settings, *, trigger: str, seed: int | None = None, parent: str | None = None
) -> int:
    """A pending run with its spec; returns its id."""
    return store.runs.create(trigger=trigger, spec=make_spec(settings, trigger=trigger, seed=seed), parent=parent)


def request_run(store: Store, settings: Settings, *, actor: str = "") -> int:
    """A manual request (``POST /v1/train``, ``continual train``): a pending run the trainer picks up (still gated).

    Its trigger starts with "manual" (``store.runs.is_request``), so it survives a restart.
    Raises :class:`RunActive` while another run is pending or running.
    """
    active = store.runs.active()
    if active:
        raise RunActive(int(active[0]["id"]), str(active[0]["status"]))
    return create_run(store, settings, trigger=f"{REQUEST}{': ' + actor if actor else ''}")


def settings_for_run(store_settings: StoreSettings, spec: Mapping[str, Any]) -> Settings:
    """The run's settings: its snapshot, with this process's store connection."""
    snapshot = dict(spec.get("settings") or {})
    merged = {**snapshot, "store": store_settings.model_dump(mode="json")}
    return settings_from_dict(merged, source=f"run spec (settings snapshot {sorted(snapshot)})")


class ProgressWriter:
    """Writes progress to the run row at most once per ``interval`` seconds (and on every phase change)."""

    def __init__(self, store: Store, run_id: int, *, enabled: bool, interval: float = 1.0) -> None:
        self.store, self.run_id, self.enabled, self.interval = store, run_id, enabled, interval
        self._last, self._phase = 0.0, ""

    def __call__(self, progress: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        phase = str(progress.get("phase", ""))
        if now - self._last < self.interval and phase == self._phase:
            return
        self._last, self._phase = now, phase
        self.store.runs.set_progress(self.run_id, progress)


def execute_run(
    store: Store,
    store_settings: StoreSettings,
    run_id: int,
    *,
    open_files: Callable[[Settings], VersionFiles],
    stop: threading.Event | None = None,
    dist: Dist | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one training run to its end and record it; returns the run's final row (rank 0).

    ``open_files(settings)`` gives the model versions of the run's data directory (the
    registry). Raises only when the outcome cannot be recorded; every training
    failure ends up as ``failed`` (or ``cancelled``) on the run row.
    """
    dist = dist or Dist()
    stop = stop or threading.Event()
    started = time.monotonic()
    row = store.runs.get(run_id)
    # Rank 0 owns the row (the other ranks may read it after rank 0 started it).
    if dist.is_main and row["status"] != "pending":
        raise RunNotPending(run_id, row["status"])
    spec = row["spec"] or {}
    try:
        settings = settings_for_run(store_settings, spec)
    except Exception as e:
        if dist.is_main:
            store.runs.start(run_id, parent=row["parent_version"], data_cutoff=0)
            store.runs.finish(run_id, "failed", error=f"bad run spec: {e}")
        return store.runs.get(run_id)
    seed = int(spec.get("seed", settings.training.seed))
    files = open_files(settings)
    progress_writer = ProgressWriter(store, run_id, enabled=dist.is_main)

    def progress(p: dict[str, Any]) -> None:
        progress_writer(p)
        if on_progress is not None:
            on_progress(p)
        if os.environ.get(HANG_ENV) and os.environ.get(HANG_ENV) == p.get("phase"):
            _hang()

    # Rank 0 fixes the data set (parent, cutoffs) and records it before any training.
    fixed: tuple[str | None, int, int] | None = None
    if dist.is_main:
        parent = row["parent_version"] or store.versions.champion_version()
        parent_cutoff = files.manifest(parent).data_cutoff if parent else 0
        data_cutoff = store.max_seq()
        store.runs.start(run_id, parent=parent, data_cutoff=data_cutoff)
        fixed = (parent, parent_cutoff, data_cutoff)
    parent, parent_cutoff, data_cutoff = dist.broadcast(fixed)  # type: ignore[misc]

    deadline = started + settings.training.max_duration_seconds

    def should_stop() -> None:
        local = stop.is_set()
        if dist.any_true(local or time.monotonic() > deadline):
            if local or stop.is_set():
                raise Cancelled()
            raise TimeBudgetExceeded(settings.training.max_duration_seconds)

    local: dict[str, Any] = {"id": run_id, "status": "succeeded", "error": None}
    try:
        outcome = build_candidate(
            store, files, settings, run_id,
            parent=parent, parent_cutoff=parent_cutoff, data_cutoff=data_cutoff, seed=seed,
            dist=dist, should_stop=should_stop, progress=progress, trigger=str(spec.get("trigger", "")),
        )  # fmt: skip
        if dist.is_main:
            outcome.metrics["duration_seconds"] = round(time.monotonic() - started, 3)
            store.runs.finish(run_id, "succeeded", candidate=outcome.version, metrics=outcome.metrics)
    except BaseException as e:
        # A DataLoader worker killed by the same SIGTERM surfaces as some other error.
        cancelled = isinstance(e, (Cancelled, KeyboardInterrupt)) or stop.is_set()
        local.update(status="cancelled" if cancelled else "failed", error=describe_error(e))
        if dist.is_main:
            if cancelled:
                store.runs.finish(run_id, "cancelled", error="cancelled: stop requested (SIGTERM)")
            else:
                store.runs.finish(run_id, "failed", error=describe_error(e))
        if not isinstance(e, Exception | Cancelled):
            raise
        if not cancelled:
            log.error("training run %d failed: %s", run_id, describe_error(e))
            log.debug("%s", traceback.format_exc())
    # Only rank 0 records; the other ranks report their own outcome.
    return store.runs.get(run_id) if dist.is_main else local


def _hang() -> None:
    log.warning("%s: hanging on purpose", HANG_ENV)
    while True:
        time.sleep(3600)


def describe_error(e: BaseException) -> str:
    if isinstance(e, TimeBudgetExceeded):
        return str(e)
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory: {e} (lower training.batch_size)"
    return f"{type(e).__name__}: {e}"
