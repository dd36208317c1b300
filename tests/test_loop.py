"""The loop's jobs called directly (no scheduler): real store, real worker child processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from looputil import digits, write_config
from sqlalchemy import select

from continual import daemon
from continual.config import Settings, load_settings
from continual.metrics import Metrics
from continual.registry import Registry
from continual.serving import Serving
from continual.store import NewSample, Store
from continual.store.engine import read_tx
from continual.store.schema import gate_decisions


def feed(store: Store, samples: list[dict[str, Any]]) -> None:
    store.insert(
        [NewSample(s["id"], s["label"], "vector", np.asarray(s["x"], np.float32).tobytes()) for s in samples]
    )


def make_loop(tmp_path: Path, over: dict[str, Any] | None = None) -> daemon.Loop:
    path = write_config(tmp_path, over)
    settings: Settings = load_settings(path, env={})
    store = Store.from_settings(settings)
    store.upgrade()
    metrics = Metrics()
    registry = Registry(settings.models_dir, store, metrics)
    return daemon.Loop(
        settings=settings, store=store, registry=registry, metrics=metrics,
        serving=Serving(settings, metrics), config_path=str(path),
    )


def decisions(store: Store) -> list[dict[str, Any]]:
    with read_tx(store.engine) as conn:
        return [dict(r._mapping) for r in conn.execute(select(gate_decisions).order_by(gate_decisions.c.id))]


def test_trigger_rules() -> None:
    s = load_settings(None, env={}, require_file=False).model_copy()
    trig = s.triggers  # min 500, max 5000, cooldown 300, max_interval 86400
    t = daemon.TriggerInput
    assert daemon.trigger_reason(t(False, 499, None, False), s) is None
    assert daemon.trigger_reason(t(False, 500, None, False), s).startswith("bootstrap")
    # With a champion: enough samples is necessary, never sufficient alone.
    assert daemon.trigger_reason(t(True, 600, 1_000.0, False), s) is None
    assert "drift" in daemon.trigger_reason(t(True, 600, 1_000.0, True), s)
    assert daemon.trigger_reason(t(True, 499, 1_000.0, True), s) is None
    assert "max_new_samples" in daemon.trigger_reason(t(True, trig.max_new_samples, 1_000.0, False), s)
    assert "max_interval" in daemon.trigger_reason(t(True, 600, trig.max_interval_seconds, False), s)
    # The cooldown holds even with drift; a manual request does not wait.
    assert daemon.trigger_reason(t(True, 10_000, 10.0, True), s) is None
    assert daemon.trigger_reason(t(True, 0, 10.0, False, requested=True), s) == "manual"
    # Nothing arrived since the last gated run: the same data would build the same candidate.
    assert daemon.trigger_reason(t(True, 10_000, 1_000.0, True, new_since_last_run=False), s) is None
    assert daemon.trigger_reason(t(True, 0, 1.0, False, requested=True, new_since_last_run=False), s) == "manual"


@pytest.mark.slow
def test_bootstrap_then_learn_a_shift_then_reject_poison(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    m = loop.metrics
    feed(loop.store, digits("original", stop=100))
    assert daemon.check(loop)["run"] is None  # 100 < min_new_samples

    feed(loop.store, digits("original", start=100, stop=900))
    out = daemon.check(loop)
    assert out["decision"] == "promoted" and out["rule"] == "bootstrap", out
    first = loop.registry.champion()
    assert loop.serving.version() == first
    assert m.registry.get_sample_value("continual_training_runs_total") == 1
    assert m.registry.get_sample_value("continual_promotions_total") == 1

    # A domain shift, then a manual request (the drift trigger is tested end to end elsewhere).
    feed(loop.store, digits("inverted", stop=900))
    daemon.request_run(loop.store, loop.settings, actor="test")
    out = daemon.check(loop)
    assert out["decision"] == "promoted", (out, decisions(loop.store)[-1])
    second = loop.registry.champion()
    assert second != first and loop.serving.version() == second
    d = decisions(loop.store)[-1]
    assert d["metrics"]["candidate_new_accuracy"] > d["metrics"]["champion_new_accuracy"] + 0.2
    for model in ("champion", "candidate"):  # the promoted candidate is now the champion
        for holdout in ("old", "new"):
            value = m.registry.get_sample_value("continual_model_accuracy_ratio", {"model": model, "holdout": holdout})
            assert value == pytest.approx(d["metrics"][f"candidate_{holdout}_accuracy"])

    # Poisoned feedback: random labels on known inputs. The candidate must be rejected.
    feed(loop.store, digits("poison", start=0, stop=600, seed=7))
    daemon.request_run(loop.store, loop.settings, actor="test")
    out = daemon.check(loop)
    assert out["decision"] == "rejected", out
    d = decisions(loop.store)[-1]
    assert d["outcome"] == "rejected" and d["rule"] in ("min_new_improvement", "significance", "max_old_forgetting")
    assert d["reasons"]
    assert loop.registry.champion() == second and loop.serving.version() == second
    assert m.registry.get_sample_value("continual_rejections_total") == 1
    assert m.registry.get_sample_value("continual_samples_pending") >= 600


@pytest.mark.slow
def test_excluded_samples_never_reach_training(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    feed(loop.store, digits("original", stop=400))
    poison = digits("poison", start=400, stop=700, seed=3)
    feed(loop.store, poison)
    loop.store.exclude([s["id"] for s in poison])
    assert loop.store.count() == 400
    out = daemon.check(loop)
    assert out["status"] == "succeeded", out
    run = daemon.runs.get_run(loop.store, out["run"])
    excluded = {s["id"] for s in poison}
    from continual.learn.data import _index_rows

    used = _index_rows(loop.store, upto=run["data_cutoff"])
    assert used and not excluded & {external_id for _seq, external_id, _label in used}
