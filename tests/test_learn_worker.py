"""The training run end to end in this process: store -> data -> loop -> registry -> run row."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from learnutil import fill, make_settings, run_here
from testkit import digit_arrays

from continual.learn.evaluate import evaluate
from continual.learn.run import create_run, make_spec, settings_for_run
from continual.models.features import FeatureCache, backbone_hash, embed_rows
from continual.registry import Registry
from continual.store import NewSample, RunNotFound, RunNotPending


def _run(store, settings, **kw):  # type: ignore[no-untyped-def]
    run_id = create_run(store, settings, trigger="test")
    return run_here(store, settings, run_id, **kw)


def _version_dirs(settings) -> list[str]:  # type: ignore[no-untyped-def]
    root = settings.models_dir
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_bootstrap_then_update_with_replay_and_ewc(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, strategy="replay+ewc", epochs=4)
    fill(store, x[:700], y[:700], "p1")
    first = _run(store, settings)
    assert first["status"] == "succeeded", first["error"]
    registry = Registry(settings.models_dir, store)
    v1 = first["candidate_version"]
    m1 = registry.manifest(v1)
    assert m1.parent is None and m1.data_cutoff == first["data_cutoff"] == store.max_seq()
    assert m1.run_id == first["id"] and m1.extra["seed"] == 1
    assert "fisher.safetensors" in m1.files
    fisher = registry.load_tensors(v1, "fisher")
    state = registry.load_state(v1)
    assert fisher and all(fisher[k].shape == state[k].shape for k in fisher)
    assert first["metrics"]["validation_accuracy"] > 0.7
    assert first["metrics"]["replay_samples"] == 0

    registry.promote(v1, expected=registry.store.versions.champion_version(), reason="manual", actor="test")
    fill(store, x[700:1000], y[700:1000], "p2")
    second = _run(store, settings)
    assert second["status"] == "succeeded", second["error"]
    m2 = registry.manifest(second["candidate_version"])
    assert m2.parent == v1 == second["parent_version"]
    assert m2.data_cutoff == store.max_seq()
    metrics = second["metrics"]
    assert metrics["parent_cutoff"] == m1.data_cutoff
    assert metrics["replay_samples"] > 100
    assert metrics["new_samples"] + sum(1 for _ in range(0)) <= store.count(after=m1.data_cutoff, split="train")
    # The candidate is not worse on the old holdout than random and learned the new data.
    old_holdout = store.draw(10_000, upto=m1.data_cutoff, split="holdout")
    model = registry.load_model(second["candidate_version"], settings)
    assert evaluate(model, store, old_holdout, settings).accuracy > 0.7
    # Online Fisher: the candidate's Fisher is decay * parent's + its own, so at least decay * parent's.
    f2 = registry.load_tensors(second["candidate_version"], "fisher")
    for k, f in fisher.items():
        assert (f2[k] >= settings.training.fisher_decay * f - 1e-6).all()


def test_naive_strategy_writes_no_fisher_and_replays_nothing(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, strategy="naive", epochs=1)
    fill(store, x[:200], y[:200], "p1")
    row = _run(store, settings)
    assert row["status"] == "succeeded", row["error"]
    m = Registry(settings.models_dir, store).manifest(row["candidate_version"])
    assert "fisher.safetensors" not in m.files
    assert m.extra["strategy"] == "naive"


def test_nan_loss_fails_the_run_and_writes_nothing(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, epochs=1, validation_fraction=0.0)
    fill(store, x[:100], y[:100], "ok")
    bad = np.full(64, np.nan, dtype="<f4").tobytes()
    store.insert([NewSample(f"nan{i}", "3", "vector", bad) for i in range(40)])
    row = _run(store, settings)
    assert row["status"] == "failed"
    assert "NonFiniteLoss" in row["error"] and "loss is nan" in row["error"]
    assert row["candidate_version"] is None
    assert _version_dirs(settings) == []


def test_a_corrupt_sample_fails_the_run_naming_it(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, epochs=1, validation_fraction=0.0)
    fill(store, x[:50], y[:50], "ok")
    store.insert([NewSample("short-vector", "1", "vector", np.zeros(10, dtype="<f4").tobytes())])
    row = _run(store, settings)
    assert row["status"] == "failed"
    assert "short-vector" in row["error"] and "10 values" in row["error"]


def test_time_budget_ends_the_run(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, epochs=500, max_duration_seconds=0.5, validation_fraction=0.0)
    fill(store, x[:400], y[:400], "p1")
    row = _run(store, settings)
    assert row["status"] == "failed"
    assert "time budget exceeded" in row["error"]
    assert _version_dirs(settings) == []


def test_stop_request_cancels_without_a_version(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, epochs=50)
    fill(store, x[:400], y[:400], "p1")
    stop = threading.Event()
    seen: list[dict] = []

    def on_progress(p: dict) -> None:
        seen.append(p)
        if p.get("phase") == "training" and p["step"] >= 3:
            stop.set()

    row = _run(store, settings, stop=stop, on_progress=on_progress)
    assert row["status"] == "cancelled"
    assert max(p.get("step", 0) for p in seen) == 3  # stopped at the next step
    assert _version_dirs(settings) == []


def test_nothing_new_fails_clearly(store, tmp_path) -> None:
    settings = make_settings(tmp_path, store.url)
    row = _run(store, settings)
    assert row["status"] == "failed" and "nothing to train" in row["error"]


def test_progress_is_written_to_the_run_row(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, epochs=2)
    fill(store, x[:300], y[:300], "p1")
    run_id = create_run(store, settings, trigger="test")
    rows: list[dict] = []

    def on_progress(p: dict) -> None:
        if p.get("phase") == "training" and not rows:
            rows.append(store.runs.get(run_id))

    run_here(store, settings, run_id, on_progress=on_progress)
    assert rows[0]["status"] == "running"
    progress = rows[0]["progress"]
    assert progress["phase"] == "training" and progress["epoch"] == 1 and "loss" in progress
    assert "samples_per_s" in progress and progress["steps"] > 0


def test_feature_extraction_caches_base_outputs(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, strategy="replay+ewc", epochs=3, head_learning_rate=1e-2)
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"mode": "feature_extraction"})})
    fill(store, x[:400], y[:400], "p1")
    first = _run(store, settings)
    assert first["status"] == "succeeded", first["error"]
    assert first["metrics"]["feature_cache"] is True
    registry = Registry(settings.models_dir, store)
    v1 = first["candidate_version"]
    # The base did not move; only the head did.
    import continual.models as models

    fresh = models.build_model(settings.model)
    torch.manual_seed(0)
    registry.promote(v1, expected=registry.store.versions.champion_version(), reason="manual")
    fill(store, x[400:600], y[400:600], "p2")
    second = _run(store, settings)
    assert second["status"] == "succeeded", second["error"]
    # Replayed samples were embedded by the same base in the first run: cache hits.
    assert second["metrics"]["feature_cache_hits"] >= second["metrics"]["replay_samples"] > 0
    s1, s2 = registry.load_state(v1), registry.load_state(second["candidate_version"])
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("backbone."))
    assert not torch.equal(s1["head.weight"], s2["head.weight"])
    assert set(registry.load_tensors(v1, "fisher")) == {"head.weight", "head.bias"}
    del fresh


def test_embed_rows_matches_the_backbone_and_uses_the_cache(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url)
    fill(store, x[:40], y[:40], "e")
    import continual.models as models

    model = models.build_model(settings.model)
    seqs = store.draw(40, split=None)[::-1]  # any order: results follow it
    cache = FeatureCache(backbone_hash(model), 100, tmp_path / "cache")
    rows = {r.seq: r for r in store.get_samples(seqs)}
    out = embed_rows(model, [rows[s] for s in seqs], spec=settings.model.input, cache=cache)
    direct = model.embed(torch.stack([torch.from_numpy(np.frombuffer(rows[s].payload, "<f4").copy()) for s in seqs]))
    np.testing.assert_allclose(out, direct.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert cache.misses == 40 and len(cache) == 40
    again = embed_rows(model, [rows[s] for s in seqs], spec=settings.model.input, cache=cache)
    np.testing.assert_array_equal(again, out)
    assert cache.hits == 40
    cache.save()
    reloaded = FeatureCache(backbone_hash(model), 100, tmp_path / "cache")
    assert len(reloaded) == 40
    small = FeatureCache("x", 10)
    for i in range(20):
        small.put(str(i), np.zeros(2, np.float32))
    assert len(small) == 10 and small.get("0") is None and small.get("19") is not None


def test_evaluate_counts_correct_predictions(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url)
    fill(store, x[:64], y[:64], "v")
    import continual.models as models

    model = models.build_model(settings.model)
    seqs = store.draw(1000, split=None)
    result = evaluate(model, store, seqs, settings, "cpu", batch_size=10)
    rows = store.get_samples(seqs)
    with torch.inference_mode():
        pred = model(torch.stack([torch.from_numpy(np.frombuffer(r.payload, "<f4").copy()) for r in rows])).argmax(1)
    labels = np.array([int(r.label) for r in rows])
    assert result.n == 64
    np.testing.assert_array_equal(result.predictions, pred.numpy())
    np.testing.assert_array_equal(result.labels, labels)
    assert result.accuracy == pytest.approx(float((pred.numpy() == labels).mean()))


def test_mark_interrupted_runs(store, tmp_path) -> None:
    settings = make_settings(tmp_path, store.url)
    a = create_run(store, settings, trigger="t")
    b = create_run(store, settings, trigger="t")
    store.runs.start(b, parent=None, data_cutoff=0)
    c = create_run(store, settings, trigger="t")
    store.runs.start(c, parent=None, data_cutoff=0)
    store.runs.finish(c, "succeeded", candidate="v")
    # Requests (POST /v1/train, `continual train`): unclaimed ones wait for the trainer, a claimed one was launched.
    waiting = create_run(store, settings, trigger="manual: cli")
    claimed = create_run(store, settings, trigger="manual")
    assert store.runs.claim(claimed) and not store.runs.claim(claimed)
    assert sorted(store.runs.interrupt_all()) == [a, b, claimed]
    assert store.runs.get(a)["status"] == store.runs.get(b)["status"] == "interrupted"
    assert store.runs.get(waiting)["status"] == "pending" and store.runs.get(claimed)["status"] == "interrupted"
    assert store.runs.claim(waiting) and not store.runs.claim(a)  # only a pending run is claimed
    assert store.runs.get(c)["status"] == "succeeded"
    # A finished run is never moved again.
    assert store.runs.finish(c, "failed", error="late") is False
    with pytest.raises(RunNotPending):
        store.runs.start(b, parent=None, data_cutoff=0)
    with pytest.raises(RunNotFound):
        store.runs.get(10_000)


def test_run_settings_come_from_the_spec_but_the_store_from_the_process(tmp_path) -> None:
    base = make_settings(tmp_path, "sqlite:///a.db", strategy="naive")
    spec = make_spec(make_settings(tmp_path, "sqlite:///secret.db", strategy="ewc", epochs=7), trigger="t")
    assert "store" not in spec["settings"] and "auth" not in spec["settings"]
    merged = settings_for_run(base.resolved_store(), spec)
    assert merged.training.strategy == "ewc" and merged.training.epochs == 7
    assert merged.store.url == "sqlite:///a.db"


def test_dataloader_worker_processes_decode_from_the_store(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, strategy="replay", epochs=2, num_workers=2)
    fill(store, x[:300], y[:300], "p1")
    row = _run(store, settings)
    assert row["status"] == "succeeded", row["error"]
    # With worker processes the data is decoded there, batch by batch, not preloaded here.
    assert row["metrics"]["preloaded"] is False
    assert row["metrics"]["validation_accuracy"] > 0.5
