from __future__ import annotations

import numpy as np
import pytest
from learnutil import fill, make_settings
from testkit import digit_arrays

from continual.learn.data import NothingToTrain, plan_run_data
from continual.learn.replay import MixedBatchSampler, draw_replay, in_validation, replay_per_batch
from continual.store import NewSample


def _vec(i: int) -> bytes:
    return np.full(4, i, dtype="<f4").tobytes()


def test_replay_draw_is_balanced_and_only_old_train_rows(store) -> None:
    # 300 samples of class "a", 100 of "b", 6 of "c" before the cutoff; more after it.
    rows = [NewSample(f"a{i}", "a", "vector", _vec(i)) for i in range(300)]
    rows += [NewSample(f"b{i}", "b", "vector", _vec(i)) for i in range(100)]
    rows += [NewSample(f"c{i}", "c", "vector", _vec(i)) for i in range(6)]
    store.insert(rows)
    cutoff = store.max_seq()
    store.insert([NewSample(f"new{i}", "c", "vector", _vec(i)) for i in range(100)])

    drawn = draw_replay(store, 60, cutoff=cutoff, seed=3)
    got = {r.seq: r for r in store.get_samples(drawn)}
    assert len(drawn) == len(set(drawn.tolist())) == 60
    assert all(r.seq <= cutoff and r.split == "train" for r in got.values())
    by_label = {lab: sum(1 for r in got.values() if r.label == lab) for lab in "abc"}
    train_c = store.count(upto=cutoff, split="train", label="c")
    # The rare class gives all its old train samples; the rest is split evenly.
    assert by_label["c"] == train_c
    assert abs(by_label["a"] - by_label["b"]) <= 1
    assert by_label["a"] + by_label["b"] + by_label["c"] == 60
    # Seeded: the same draw twice, a different one with another seed.
    assert np.array_equal(drawn, draw_replay(store, 60, cutoff=cutoff, seed=3))
    assert not np.array_equal(drawn, draw_replay(store, 60, cutoff=cutoff, seed=4))
    assert len(draw_replay(store, 60, cutoff=0, seed=3)) == 0


def test_mixed_batches_hold_the_ratio_and_cover_new_data_once() -> None:
    s = MixedBatchSampler(n_new=100, n_replay=40, batch_size=10, replay_ratio=0.3, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 15  # ceil(100 / 7)
    new_seen = [i for b in batches for i in b if i < 100]
    assert sorted(new_seen) == list(range(100))
    assert all(sum(i >= 100 for i in b) == 3 for b in batches)
    s.set_epoch(1)
    assert list(s) != batches  # a new order every epoch


def test_no_replay_and_ratio_edges() -> None:
    assert replay_per_batch(32, 0.5, 0) == 0
    assert replay_per_batch(32, 0.0, 100) == 0
    assert replay_per_batch(32, 0.5, 100) == 16
    assert replay_per_batch(2, 0.9, 100) == 1  # always one new sample per batch
    batches = list(MixedBatchSampler(n_new=10, n_replay=0, batch_size=4, replay_ratio=0.5, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(10))
    with pytest.raises(ValueError, match="n_new"):
        MixedBatchSampler(n_new=0, n_replay=5, batch_size=4, replay_ratio=0.5, seed=0)


def test_ranks_get_disjoint_batches_and_the_same_step_count() -> None:
    kw = {"n_new": 50, "n_replay": 20, "batch_size": 8, "replay_ratio": 0.25, "seed": 5, "world_size": 2}
    r0 = list(MixedBatchSampler(rank=0, **kw))
    r1 = list(MixedBatchSampler(rank=1, **kw))
    assert len(r0) == len(r1)
    new0 = {i for b in r0 for i in b if i < 50}
    new1 = {i for b in r1 for i in b if i < 50}
    assert not new0 & new1


def test_validation_slice_is_a_pure_function_of_the_id() -> None:
    ids = [f"s{i}" for i in range(4000)]
    picked = [i for i in ids if in_validation(i, 0.1)]
    assert 300 < len(picked) < 500
    assert picked == [i for i in ids if in_validation(i, 0.1)]
    assert not any(in_validation(i, 0.0) for i in ids)


def test_run_data_never_contains_holdout_and_splits_old_from_new(store, tmp_path) -> None:
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, strategy="replay", replay_buffer=200, validation_fraction=0.1)
    fill(store, x[:600], y[:600], "old")
    cutoff = store.max_seq()
    fill(store, x[600:900], y[600:900], "new")
    data = plan_run_data(store, settings, parent_cutoff=cutoff, data_cutoff=store.max_seq(), seed=0)
    everything = np.concatenate([data.new, data.replay, data.validation])
    rows = {r.seq: r for r in store.get_samples(everything)}
    assert len(rows) == len(everything) == len(set(everything.tolist()))
    assert all(r.split == "train" for r in rows.values())  # holdout never reaches training
    assert all(s > cutoff for s in data.new)
    assert all(s <= cutoff for s in data.replay)
    assert len(data.replay) > 150
    assert all(in_validation(rows[s].external_id, 0.1) for s in data.validation)
    assert not any(in_validation(rows[s].external_id, 0.1) for s in np.concatenate([data.new, data.replay]))
    train_new = store.count(after=cutoff, split="train")
    assert len(data.new) + sum(1 for s in data.validation if s > cutoff) == train_new
    assert [rows[s].label for s in data.new] == [str(v) for v in data.new_labels]

    naive = make_settings(tmp_path, store.url, strategy="naive")
    assert len(plan_run_data(store, naive, parent_cutoff=cutoff, data_cutoff=store.max_seq(), seed=0).replay) == 0
    with pytest.raises(NothingToTrain, match="nothing to train"):
        plan_run_data(store, naive, parent_cutoff=store.max_seq(), data_cutoff=store.max_seq(), seed=0)


def test_unknown_labels_are_skipped_not_fatal(store, tmp_path) -> None:
    x, y = digit_arrays()
    fill(store, x[:50], y[:50], "ok")
    store.insert([NewSample(f"odd{i}", "cat", "vector", x[i].astype("<f4").tobytes()) for i in range(20)])
    settings = make_settings(tmp_path, store.url, validation_fraction=0.0)
    data = plan_run_data(store, settings, parent_cutoff=0, data_cutoff=store.max_seq(), seed=0)
    assert data.skipped_unknown_labels == store.count(split="train", label="cat")
    assert len(data.new) == store.count(split="train") - data.skipped_unknown_labels
