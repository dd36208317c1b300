"""The service's jobs called directly (no scheduler): real store, real worker child processes."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from looputil import make_loop
from sqlalchemy import update
from testkit import digit_samples

from continual.config import load_settings
from continual.learn.run import create_run, request_run
from continual.models import build_model
from continual.procutil import process_alive
from continual.service import jobs, recovery
from continual.store import NewSample, Store
from continual.store.engine import write_tx
from continual.store.schema import training_runs
from continual.triggers import TriggerInput, failure_backoff, trigger_reason


def feed(store: Store, samples: list[dict[str, Any]]) -> None:
    store.insert([NewSample(s["id"], s["label"], "vector", np.asarray(s["x"], np.float32).tobytes()) for s in samples])


def decisions(store: Store) -> list[dict[str, Any]]:
    return store.records.decisions()


def test_trigger_rules() -> None:
    s = load_settings(None, env={}, require_file=False).model_copy()
    trig = s.triggers  # min 500, max 5000, cooldown 300, max_interval 86400
    t = TriggerInput
    assert trigger_reason(t(False, 499, None, False), s.triggers) is None
    assert trigger_reason(t(False, 500, None, False), s.triggers).startswith("bootstrap")
    # With a champion: enough samples is necessary, never sufficient alone.
    assert trigger_reason(t(True, 600, 1_000.0, False), s.triggers) is None
    assert "drift" in trigger_reason(t(True, 600, 1_000.0, True), s.triggers)
    assert trigger_reason(t(True, 499, 1_000.0, True), s.triggers) is None
    assert "max_new_samples" in trigger_reason(t(True, trig.max_new_samples, 1_000.0, False), s.triggers)
    assert "max_interval" in trigger_reason(t(True, 600, trig.max_interval_seconds, False), s.triggers)
    # The cooldown holds even with drift; a manual request does not wait.
    assert trigger_reason(t(True, 10_000, 10.0, True), s.triggers) is None
    assert trigger_reason(t(True, 0, 10.0, False, requested=True), s.triggers) == "manual"
    # Nothing arrived since the last gated run: the same data would build the same candidate.
    assert trigger_reason(t(True, 10_000, 1_000.0, True, new_since_last_run=False), s.triggers) is None
    assert trigger_reason(t(True, 0, 1.0, False, requested=True, new_since_last_run=False), s.triggers) == "manual"
    # The reasons are recorded on the run row: exact, and the cooldown ends at exactly cooldown_seconds.
    assert trigger_reason(t(True, 600, 300.0, True), trig) == "drift detected with 600 new samples"
    assert trigger_reason(t(True, 600, 299.9, True), trig) is None
    assert trigger_reason(t(False, 500, None, False), trig) == "bootstrap: 500 samples >= min_new_samples 500"
    assert trigger_reason(t(True, 5000, 300.0, False), trig) == "5000 new samples >= max_new_samples 5000"
    assert (
        trigger_reason(t(True, 600, 86_400.0, False), trig) == "600 new samples and max_interval_seconds 86400 passed"
    )
    failed = t(True, 600, 1e9, True, consecutive_failures=2)
    assert trigger_reason(failed, trig) == "drift detected with 600 new samples (after 2 failed runs in a row)"


def test_a_ready_new_class_is_a_trigger_of_its_own() -> None:
    s = load_settings(None, env={}, require_file=False)  # min_class_samples 50, min_class_holdout 10
    t = TriggerInput
    fox = ("fox", 50, 10)
    assert trigger_reason(t(True, 60, 1_000.0, False, new_classes=(fox,)), s.triggers) == (
        "new class 'fox' has 60 samples (50 train, 10 holdout)"
    )
    # Below either threshold it waits; the other rules still apply.
    assert (
        trigger_reason(t(True, 60, 1_000.0, False, new_classes=(("fox", 49, 99), ("owl", 99, 9))), s.triggers) is None
    )
    two = (("owl", 10, 2), fox, ("emu", 70, 12))
    assert trigger_reason(t(True, 5, 1_000.0, False, new_classes=two), s.triggers) == (
        "new class 'fox' has 60 samples (50 train, 10 holdout) (and 1 more new classes)"
    )
    # The cooldown, the failure backoff and "nothing new since the last gated run" hold for it too.
    assert trigger_reason(t(True, 60, 10.0, False, new_classes=(fox,)), s.triggers) is None
    assert trigger_reason(t(True, 60, 1_000.0, False, new_since_last_run=False, new_classes=(fox,)), s.triggers) is None
    assert "after 2 failed runs" in trigger_reason(
        t(True, 60, 10_000.0, False, consecutive_failures=2, new_classes=(fox,)), s.triggers
    )
    # Before a champion exists the bootstrap rule decides (its run takes the ready classes along).
    assert trigger_reason(t(False, 60, None, False, new_classes=(fox,)), s.triggers) is None


def test_the_check_sees_the_classes_the_champion_lacks(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, {"model": {"classes": ["0", "1", "2"], "new_classes": "accept", "max_classes": 5}})
    store = loop.store
    feed(store, [s for s in digit_samples("original", stop=300) if s["label"] in ("0", "1", "2", "3", "7")])
    assert jobs.new_classes(loop, None) == ()  # no champion yet: bootstrap decides
    gauge = loop.metrics.registry.get_sample_value
    assert gauge("continual_class_samples", {"label": "3"}) == store.count(label="3")
    model = build_model(loop.settings.model.model_copy(update={"classes": ("0", "1", "2", "3")}))
    loop.registry.import_model(model, input_spec=loop.settings.model.input.model_dump(mode="json"))
    champion = store.versions.champion()
    assert champion is not None and champion.classes == ("0", "1", "2", "3")
    assert jobs.new_classes(loop, champion) == (("7", store.count(label="7", split="train"),
                                                 store.count(label="7", split="holdout")),)  # fmt: skip
    # The metric's label set stays within max_classes, configured classes first.
    feed(store, [{"id": f"z{i}", "label": f"z{i}", "x": [0.0] * 64} for i in range(4)])
    jobs.new_classes(loop, champion)
    labels = {s.labels["label"] for s in loop.metrics.class_samples.collect()[0].samples}
    assert labels == {"0", "1", "2", "3", "7"}
    store.dispose()


def test_bootstrap_waits_for_cooldown_and_new_data() -> None:
    s = load_settings(None, env={}, require_file=False)
    t = TriggerInput
    # A first candidate below min_accuracy is not rebuilt from the same data every tick.
    assert trigger_reason(t(False, 10_000, 1_000.0, False, new_since_last_run=False), s.triggers) is None
    assert trigger_reason(t(False, 10_000, 10.0, False), s.triggers) is None  # cooldown 300
    assert trigger_reason(t(False, 10_000, 1_000.0, False), s.triggers).startswith("bootstrap")


def test_failure_backoff_doubles_up_to_max_interval() -> None:
    s = load_settings(None, env={}, require_file=False)
    trig = s.triggers  # cooldown 300, check interval 60, max_interval 86400
    waits = [failure_backoff(k, trig) for k in range(12)]
    assert waits[:5] == [300, 300, 600, 1200, 2400]
    assert all(a <= b for a, b in itertools.pairwise(waits)) and waits[-1] == trig.max_interval_seconds
    assert failure_backoff(10_000, trig) == trig.max_interval_seconds  # no float overflow
    # A zero cooldown still backs off, from the check interval.
    zero = trig.model_copy(update={"cooldown_seconds": 0.0, "check_interval_seconds": 5.0})
    assert [failure_backoff(k, zero) for k in range(4)] == [0, 5, 10, 20]

    t = TriggerInput
    after_3 = t(True, 10_000, 1_000.0, True, consecutive_failures=3)  # waits 1200 s
    assert trigger_reason(after_3, s.triggers) is None
    late = t(True, 10_000, 1_300.0, True, consecutive_failures=3)
    assert trigger_reason(late, s.triggers) == "drift detected with 10000 new samples (after 3 failed runs in a row)"
    # A manual request is never held back by failures.
    assert trigger_reason(t(True, 0, 1.0, False, requested=True, consecutive_failures=9), s.triggers) == "manual"


def test_consecutive_failures_counts_back_to_the_last_success(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    store, settings = loop.store, loop.settings

    def finished(status: str, error: str | None = None) -> int:
        run_id = create_run(store, settings, trigger="test")
        store.runs.start(run_id, parent=None, data_cutoff=0)
        assert store.runs.finish(run_id, status, error=error or (None if status == "succeeded" else status))
        return run_id

    assert store.runs.consecutive_failures() == 0
    finished("failed")
    assert store.runs.consecutive_failures() == 1
    finished("succeeded")
    assert store.runs.consecutive_failures() == 0
    for status in ("failed", "interrupted", "failed", "cancelled", "failed"):
        finished(status)
    assert store.runs.consecutive_failures() == 3  # a restart or a cancel is not the trainer failing
    finished("failed", "NothingToTrain: no new train-split samples ...")  # nor is a request with no new data
    assert store.runs.consecutive_failures() == 3
    create_run(store, settings, trigger="test")  # active runs are not finished ones
    assert store.runs.consecutive_failures() == 3
    store.dispose()


@pytest.mark.slow
def test_a_failed_bootstrap_run_is_retried_only_after_the_backoff(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, {"triggers": {"check_interval_seconds": 30}})
    store, settings = loop.store, loop.settings
    feed(store, digit_samples("original", stop=300))  # >= min_new_samples (200): bootstrap is due
    run_id = create_run(store, settings, trigger="test")
    store.runs.start(run_id, parent=None, data_cutoff=store.max_seq())
    store.runs.finish(run_id, "failed", error="CUDA out of memory")

    out = jobs.check(loop)  # cooldown 0, but one failure waits one check interval (30 s)
    assert out["run"] is None and store.runs.recent() == store.runs.recent(status="failed"), out
    gauge = loop.metrics.registry.get_sample_value
    assert gauge("continual_training_failures_consecutive") == 1
    with write_tx(store.engine) as conn:  # the failure is now 31 s old
        conn.execute(
            update(training_runs)
            .where(training_runs.c.id == run_id)
            .values(finished_at=datetime.now(UTC) - timedelta(seconds=31))
        )
    out = jobs.check(loop)
    assert out["run"] is not None and out["run"] != run_id, out
    assert "after 1 failed runs in a row" in store.runs.get(out["run"])["trigger"]
    assert store.runs.get(out["run"])["status"] == "succeeded"
    jobs.check(loop)  # the next tick counts again: the success reset it
    assert gauge("continual_training_failures_consecutive") == 0
    store.dispose()


def test_the_trainer_interrupts_abandoned_pending_runs(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    store, settings = loop.store, loop.settings
    old_cli = create_run(store, settings, trigger="cli")  # a `train --now` that never launched its worker
    with write_tx(store.engine) as conn:
        conn.execute(
            update(training_runs)
            .where(training_runs.c.id == old_cli)
            .values(created_at=datetime.now(UTC) - timedelta(seconds=recovery.UNSTARTED_GRACE + 60))
        )
    fresh_cli = create_run(store, settings, trigger="cli")  # its worker may be starting right now
    claimed = create_run(store, settings, trigger="manual")
    assert store.runs.claim(claimed)  # by a trainer that then died

    out = jobs.check(loop)
    assert out["run"] is None, out
    status = {r: store.runs.get(r)["status"] for r in (old_cli, fresh_cli, claimed)}
    assert status == {old_cli: "interrupted", fresh_cli: "pending", claimed: "interrupted"}, status
    store.dispose()


@pytest.mark.slow
def test_a_run_requested_while_the_service_was_down_runs_after_the_restart(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, {"triggers": {"min_new_samples": 10_000, "max_new_samples": 10_000}})
    store = loop.store
    feed(store, digit_samples("original", stop=300))
    # Asked for while the service was down, then a run it had created but never started.
    requested = request_run(store, loop.settings, actor="cli")
    stale = create_run(store, loop.settings, trigger="drift detected with 300 new samples")

    recovery.recover(loop)
    assert store.runs.get(stale)["status"] == "interrupted"
    assert store.runs.get(requested)["status"] == "pending"
    out = jobs.check(loop)  # below min_new_samples: only the request makes it train
    assert out["run"] == requested and out["status"] == "succeeded", out
    row = store.runs.get(requested)
    assert row["trigger"] == "manual: cli" and row["candidate_version"] and row["host"], row
    assert jobs.check(loop)["run"] is None  # done: nothing else to start
    store.dispose()


@pytest.mark.slow
def test_bootstrap_then_learn_a_shift_then_reject_poison(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    m = loop.metrics
    feed(loop.store, digit_samples("original", stop=100))
    assert jobs.check(loop)["run"] is None  # 100 < min_new_samples

    feed(loop.store, digit_samples("original", start=100, stop=900))
    out = jobs.check(loop)
    assert out["decision"] == "promoted" and out["rule"] == "bootstrap", out
    first = loop.store.versions.champion_version()
    assert loop.serving.version() == first
    assert m.registry.get_sample_value("continual_training_runs_total") == 1
    assert m.registry.get_sample_value("continual_promotions_total") == 1

    # A domain shift, then a manual request (the drift trigger is tested end to end elsewhere).
    feed(loop.store, digit_samples("inverted", stop=900))
    request_run(loop.store, loop.settings, actor="test")
    out = jobs.check(loop)
    assert out["decision"] == "promoted", (out, decisions(loop.store)[-1])
    second = loop.store.versions.champion_version()
    assert second != first and loop.serving.version() == second
    d = decisions(loop.store)[-1]
    assert d["metrics"]["candidate_new_accuracy"] > d["metrics"]["champion_new_accuracy"] + 0.2
    for model in ("champion", "candidate"):  # the promoted candidate is now the champion
        for holdout in ("old", "new"):
            value = m.registry.get_sample_value("continual_model_accuracy_ratio", {"model": model, "holdout": holdout})
            assert value == pytest.approx(d["metrics"][f"candidate_{holdout}_accuracy"])

    # Poisoned feedback: random labels on known inputs. The candidate must be rejected.
    feed(loop.store, digit_samples("poison", start=0, stop=600, seed=7))
    request_run(loop.store, loop.settings, actor="test")
    out = jobs.check(loop)
    assert out["decision"] == "rejected", out
    d = decisions(loop.store)[-1]
    assert d["outcome"] == "rejected" and d["rule"] in ("min_new_improvement", "significance", "max_old_forgetting")
    assert d["reasons"]
    assert loop.store.versions.champion_version() == second and loop.serving.version() == second
    assert m.registry.get_sample_value("continual_rejections_total") == 1
    assert m.registry.get_sample_value("continual_samples_pending") >= 600


@pytest.mark.slow
def test_excluded_samples_never_reach_training(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    feed(loop.store, digit_samples("original", stop=400))
    poison = digit_samples("poison", start=400, stop=700, seed=3)
    feed(loop.store, poison)
    loop.store.exclude([s["id"] for s in poison])
    assert loop.store.count() == 400
    out = jobs.check(loop)
    assert out["status"] == "succeeded", out
    run = loop.store.runs.get(out["run"])
    excluded = {s["id"] for s in poison}
    used = loop.store.train_index(upto=run["data_cutoff"])
    assert used and not excluded & {external_id for _seq, external_id, _label in used}


def test_stop_ends_the_ticks_marks_stopping_and_frees_the_lease(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    assert loop.hold_trainer_lease()
    jobs.stop(loop, None)
    assert loop.state.current == "stopping"
    assert loop.metrics.registry.get_sample_value("continual_state", {"state": "stopping"}) == 1
    assert loop.store.leases.holder_of("trainer") is None
    assert jobs.check(loop) == {"skipped": "stopping"}
    loop.store.dispose()


@pytest.mark.slow
def test_a_trainer_that_loses_the_lease_mid_run_stops_its_worker(tmp_path: Path) -> None:
    """Another process took the lease (this one stalled past its TTL): this one must stop training, not finish."""
    from continual.learn.launch import wait_for_progress
    from continual.service import trainer
    from continual.service.context import TRAINER_LEASE

    loop = make_loop(tmp_path, {"training": {"epochs": 5000, "early_stopping_patience": 100_000}})
    store = loop.store
    feed(store, digit_samples("original", stop=300))
    assert loop.hold_trainer_lease()
    run_id = create_run(store, loop.settings, trigger="test")
    outcome: list[trainer.RunOutcome] = []
    thread = threading.Thread(target=lambda: outcome.append(trainer.train_and_gate(loop, run_id)), daemon=True)
    thread.start()
    try:
        assert wait_for_progress(store, run_id, phase="training", timeout=120)["status"] == "running"
        worker_pid = int(store.runs.get(run_id)["pid"])
        # The lease expires under this process and another one takes it.
        store.leases.release(TRAINER_LEASE, loop.holder)
        assert store.leases.try_acquire(TRAINER_LEASE, "elsewhere:1", 600)
        lost_at = time.monotonic()
        thread.join(60)
        assert not thread.is_alive(), "the trainer went on training without the lease"
    finally:
        loop.stop.set()  # on failure: cancel the worker (the trainer's own stop path)
        thread.join(60)
    took = time.monotonic() - lost_at
    row = store.runs.get(run_id)
    assert (row["status"], row["candidate_version"]) == ("cancelled", None), row
    assert "trainer lease moved to elsewhere:1" in row["error"], row
    assert not process_alive(worker_pid)
    assert outcome[0].status == "cancelled" and outcome[0].decision is None
    assert store.records.last_decision() is None and store.versions.champion_version() is None
    (event,) = store.records.events(kind="trainer_lease_lost")
    assert event["data"] == {"run_id": run_id, "holder": "elsewhere:1", "lost_by": loop.holder}
    assert took < 30, f"stopping took {took:.1f} s"
    assert store.leases.holder_of(TRAINER_LEASE) == "elsewhere:1"  # and it did not take the lease back
    store.dispose()
