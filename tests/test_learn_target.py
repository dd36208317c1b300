"""Target data from the prediction log, and a run that adapts with it (store → run → manifest)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import numpy as np
from learnutil import fill, make_settings, run_here
from testkit import digit_arrays

from continual.demo.digits import shift
from continual.learn.run import create_run
from continual.learn.target import plan_target
from continual.predlog import new_prediction_id
from continual.registry import Registry
from continual.store import PredictionRecord, Store

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _log(store: Store, vectors: np.ndarray, *, start: float, at: datetime = T0, keep: bool = True) -> list[str]:
    records = []
    for i, v in enumerate(vectors):
        payload = np.asarray(v, dtype="<f4").tobytes()
        records.append(
            PredictionRecord(
                id=new_prediction_id(start + i / 1000), created_at=at + timedelta(seconds=i), model_version="v1",
                label="0", confidence=0.5, scores=None, kind="vector", sha256=hashlib.sha256(payload).hexdigest(),
                payload=payload if keep else None, input_policy="all" if keep else "none",
            )
        )  # fmt: skip
    store.predictions.insert(records)
    return [r.id for r in records]


def test_logged_inputs_are_newest_first_deduplicated_and_never_holdout(store: Store) -> None:
    x, y = digit_arrays()
    fill(store, x[:200], y[:200], "s")
    holdout = [r for r in store.get_samples(list(range(1, 201))) if r.split == "holdout"]
    assert holdout
    held = np.frombuffer(holdout[0].payload, dtype="<f4")
    fresh = x[300:310]
    # Ten fresh inputs, two repeats of the first, a holdout sample's input, one input not kept.
    ids = _log(store, np.concatenate([fresh, fresh[:2], held[None], x[400:401]]), start=1_790_000_000.0)
    _log(store, x[401:402], start=1_790_000_100.0, keep=False)
    inputs, repeats = store.predictions.logged_inputs(limit=100)
    assert repeats == 2
    # Newest first; a repeated input counts once, at its newest logging; the holdout input and the unkept one are out.
    assert [i.id for i in inputs] == [ids[13], ids[11], ids[10], *reversed(ids[2:10])]
    assert holdout[0].sha256 not in {i.sha256 for i in inputs}
    assert [i.id for i in store.predictions.logged_inputs(limit=3)[0]] == [ids[13], ids[11], ids[10]]
    # Made at or before a moment (the drift check's): the later ones are left out.
    before = store.predictions.logged_inputs(limit=100, before=T0 + timedelta(seconds=4))[0]
    assert sorted(i.id for i in before) == sorted(ids[:5])
    assert store.predictions.logged_inputs(limit=100, kind="image")[0] == []


def test_target_is_the_flagged_drift_window_else_the_newest(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, _ = digit_arrays()
    settings = make_settings(tmp_path, store.url)
    early = _log(store, x[:5], start=1_790_000_000.0)
    plan = plan_target(store, settings)
    assert plan.info["source"] == "latest" and "fallback" in plan.info and len(plan) == 5
    store.records.add_drift_check(
        champion="v1", detected=True, n_reference=1, n_current=1, duration_seconds=0.1, results={}
    )
    later = _log(store, x[5:10], start=1_790_000_500.0, at=datetime.now(UTC) + timedelta(hours=1))
    plan = plan_target(store, settings)
    assert plan.info["source"] == "drift_window" and plan.info["drift_check_id"] >= 1
    assert {i.id for i in plan.inputs} == set(early)
    latest = settings.model_copy(update={"adaptation": settings.adaptation.model_copy(update={"target": "latest"})})
    assert {i.id for i in plan_target(store, latest).inputs} == set(early) | set(later)


def test_a_run_adapts_with_logged_inputs_and_records_it(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, y = digit_arrays()
    fill(store, x[:400], y[:400], "p1")
    _log(store, shift(x[400:700].reshape(-1, 8, 8), "inverted").reshape(-1, 64), start=1_790_000_000.0)
    settings = make_settings(tmp_path, store.url, epochs=2, adaptation="dann")
    row = run_here(store, settings, create_run(store, settings, trigger="test"))
    assert row["status"] == "succeeded", row["error"]
    info = row["metrics"]["adaptation"]
    assert info["method"] == "dann" and "skipped" not in info
    assert info["target"]["n"] == 300 and info["target"]["source"] == "latest"
    assert all("domain_loss" in h for h in row["metrics"]["history"])
    manifest = Registry(settings.models_dir, store).manifest(row["candidate_version"])
    assert manifest.extra["adaptation"] == info
    # The MLP has no BatchNorm: AdaBN says so and the run still trains.
    adabn = make_settings(tmp_path, store.url, epochs=1, adaptation="adabn")
    row = run_here(store, adabn, create_run(store, adabn, trigger="test"))
    assert row["status"] == "succeeded", row["error"]
    assert "no BatchNorm" in row["metrics"]["adaptation"]["skipped"]
    # Too few logged inputs: skipped, with the reason.
    few = adabn.model_copy(update={"adaptation": adabn.adaptation.model_copy(update={"min_target_samples": 1000})})
    row = run_here(store, few, create_run(store, few, trigger="test"))
    assert "min_target_samples" in row["metrics"]["adaptation"]["skipped"]
