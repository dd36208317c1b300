"""The hourly retention job: model versions by [model] keep_versions, and what else would grow forever."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
from looputil import make_loop
from sqlalchemy import update

from continual.learn.run import create_run
from continual.models import build_model
from continual.service import jobs
from continual.store.engine import write_tx
from continual.store.schema import drift_checks, events, training_runs


def _import(ctx, seed: int, *, promote: bool) -> str:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = build_model(ctx.settings.model)
    spec = ctx.settings.model.input.model_dump(mode="json")
    return ctx.registry.import_model(model, input_spec=spec, promote=promote).version


def test_the_scheduled_job_keeps_model_keep_versions(tmp_path: Path) -> None:
    ctx = make_loop(tmp_path, {"model": {"keep_versions": 2}})
    champion = _import(ctx, 0, promote=True)
    others = [_import(ctx, i, promote=False) for i in range(1, 6)]
    pruned = jobs.retention(ctx)
    # The newest two stay, and the champion (older than both) with them.
    assert pruned.versions == others[:3]
    alive = {v["version"] for v in ctx.store.versions.rows() if v["status"] != "deleted"}
    assert alive == {champion, *others[3:]}
    ctx.store.dispose()


def test_events_drift_checks_specs_and_run_logs_are_pruned_by_age_and_count(tmp_path: Path) -> None:
    ctx = make_loop(
        tmp_path,
        {
            "retention": {
                "events_days": 10,
                "events_max_rows": 5,
                "drift_checks_days": 10,
                "drift_checks_max_rows": 3,
                "run_logs_days": 10,
                "run_specs_days": 10,
            }
        },
    )
    store = ctx.store
    for i in range(8):
        store.records.add_event("test", f"event {i}")
    for _ in range(6):
        store.records.add_drift_check(
            champion=None, detected=False, n_reference=1, n_current=1, duration_seconds=0.1, results={}
        )
    old, recent, active = (create_run(store, ctx.settings, trigger="t") for _ in range(3))
    for run_id in (old, recent):
        store.runs.start(run_id, parent=None, data_cutoff=0)
        store.runs.finish(run_id, "failed", error="x")
    long_ago = datetime.now(UTC) - timedelta(days=30)
    with write_tx(store.engine) as conn:
        conn.execute(update(events).where(events.c.id <= 2).values(created_at=long_ago))  # 2 old ones
        conn.execute(update(drift_checks).where(drift_checks.c.id == 6).values(created_at=long_ago))
        conn.execute(update(training_runs).where(training_runs.c.id.in_([old, active])).values(created_at=long_ago))
    logs = ctx.settings.service.data_dir / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    stale, fresh = logs / f"{old}.log", logs / f"{recent}.log"
    stale.write_text("old"), fresh.write_text("new")
    a_month_ago = time.time() - 30 * 86_400
    os.utime(stale, (a_month_ago, a_month_ago))

    pruned = jobs.retention(ctx)

    assert [e["message"] for e in store.records.events(kind="test")] == [f"event {i}" for i in (7, 6, 5, 4, 3)]
    assert pruned.events == 3
    # Count keeps ids 4..6, age removes 6 (backdated): ids 4 and 5 remain.
    assert [d["id"] for d in store.records.drift_checks()] == [4, 5] and pruned.drift_checks == 4
    assert store.runs.get(old)["spec"] is None and store.runs.get(old)["status"] == "failed"  # the row stays
    assert store.runs.get(recent)["spec"] is not None
    assert store.runs.get(active)["spec"] is not None  # a pending run keeps what it will train with
    assert pruned.run_specs == 1
    assert pruned.run_logs == [stale.name] and not stale.exists() and fresh.exists()
    assert jobs.retention(ctx).events == 0  # idempotent
    store.dispose()
