from __future__ import annotations

import numpy as np
import pytest
from learnutil import fill, make_settings
from testkit import digit_arrays

from continual.learn.data import NothingToTrain, plan_run_data
from continual.learn.replay import (
    MAX_OLD_VALIDATION,
    MIN_OLD_VALIDATION,
    MixedBatchSampler,
    balanced_replay_ratio,
    class_balance,
    draw_old_validation,
    draw_replay,
    in_validation,
    old_validation_per_class,
    replay_per_batch,
    uses_ewc,
    uses_replay,
)
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
    assert not any(in_validation(i, -1.0) for i in ids)
    # Pinned (computed once, kept): a changed salt or hash would move samples between training and validation.
    assert [f"s{i}" for i in range(40) if in_validation(f"s{i}", 0.2)] == [
        "s4", "s7", "s17", "s21", "s22", "s26", "s27", "s30", "s31", "s32", "s33", "s38",
    ]  # fmt: skip
    assert all(in_validation(i, 1.0) for i in ids[:100])


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


def test_a_run_that_adds_classes_validates_every_old_class_beyond_the_replay_draw(store, tmp_path) -> None:
    # Digits 0-4 before the parent's cutoff, digits 5-6 after it; a 50-sample buffer holds ~10 per old class,
    # so its own share of the validation slice is about one sample a class.
    x, y = digit_arrays()
    old, new = np.isin(y, [0, 1, 2, 3, 4]), np.isin(y, [5, 6])
    fill(store, x[old], y[old], "old")
    cutoff = store.max_seq()
    fill(store, x[new], y[new], "new")
    settings = make_settings(tmp_path, store.url, strategy="replay", replay_buffer=50, validation_fraction=0.1)
    classes = [str(c) for c in range(7)]
    kw = {"parent_cutoff": cutoff, "data_cutoff": store.max_seq(), "seed": 0, "classes": classes}
    data = plan_run_data(store, settings, **kw, added=["5", "6"])
    same_classes = plan_run_data(store, settings, **kw)  # the same rows, no class added: the replay draw's share
    rows = {r.seq: r for r in store.get_samples(np.concatenate([data.new, data.replay, data.validation]))}
    assert all(r.split == "train" for r in rows.values())
    assert all(in_validation(rows[s].external_id, 0.1) for s in data.validation)
    assert not set(data.validation.tolist()) & set(np.concatenate([data.new, data.replay]).tolist())
    # Training is untouched: the same new samples and the same replay draw.
    assert np.array_equal(data.new, same_classes.new) and np.array_equal(data.replay, same_classes.replay)
    for c in range(5):
        available = sum(
            1 for _, i, label in store.train_index(upto=cutoff) if label == str(c) and in_validation(i, 0.1)
        )
        got = int(np.sum(data.validation_labels == c))
        assert got == min(available, MIN_OLD_VALIDATION), (c, got, available)
        assert got > int(np.sum(same_classes.validation_labels == c))
    # The new classes' validation samples are all theirs, as before.
    for c in (5, 6):
        assert np.sum(data.validation_labels == c) == np.sum(same_classes.validation_labels == c) > 0


def test_old_validation_draw_takes_only_the_slice_and_its_cap(store) -> None:
    rows = [NewSample(f"{lab}{i}", lab, "vector", _vec(i)) for lab in "abc" for i in range(400)]
    store.insert(rows)
    cutoff = store.max_seq()
    store.insert([NewSample(f"late{i}", "a", "vector", _vec(i)) for i in range(400)])
    got = draw_old_validation(store, 15, cutoff=cutoff, labels=["a", "b"], fraction=0.1, seed=2)
    assert [r[0] for r in got] == sorted(r[0] for r in got)
    assert all(seq <= cutoff and in_validation(i, 0.1) for seq, i, _ in got)
    assert {lab: sum(r[2] == lab for r in got) for lab in "abc"} == {"a": 15, "b": 15, "c": 0}
    assert got == draw_old_validation(store, 15, cutoff=cutoff, labels=["a", "b"], fraction=0.1, seed=2)
    assert draw_old_validation(store, 15, cutoff=cutoff, labels=["a"], fraction=0.0, seed=2) == []
    assert draw_old_validation(store, 0, cutoff=cutoff, labels=["a"], fraction=0.1, seed=2) == []
    assert draw_old_validation(store, 15, cutoff=0, labels=["a"], fraction=0.1, seed=2) == []
    with pytest.raises(ValueError, match="per_class must be >= 0, got -1"):
        draw_old_validation(store, -1, cutoff=cutoff, labels=["a"], fraction=0.1, seed=2)


def test_each_old_class_gets_a_new_class_s_share_of_validation_within_bounds() -> None:
    assert old_validation_per_class(90, 2) == 45  # as many as a new class has on average
    assert old_validation_per_class(91, 2) == 46
    assert old_validation_per_class(3, 3) == old_validation_per_class(0, 1) == MIN_OLD_VALIDATION
    assert old_validation_per_class(50_000, 1) == MAX_OLD_VALIDATION  # bounded however large the new class
    for bad in ((10, 0), (-1, 1)):
        with pytest.raises(ValueError, match="need n_new_classes >= 1 and n_new_validation >= 0"):
            old_validation_per_class(*bad)


def test_balanced_replay_ratio_gives_each_class_the_same_share() -> None:
    assert balanced_replay_ratio(5, 7) == pytest.approx(5 / 7)
    # Seven old and three new classes in a batch of 30: 21 replayed, 3 per class old and new alike.
    assert replay_per_batch(30, balanced_replay_ratio(7, 10), n_replay=400) == 21
    for bad in ((0, 3), (3, 3), (4, 3)):
        with pytest.raises(ValueError, match="need 1 <= n_old_classes < n_classes"):
            balanced_replay_ratio(*bad)


def test_unknown_labels_are_skipped_not_fatal(store, tmp_path) -> None:
    x, y = digit_arrays()
    fill(store, x[:50], y[:50], "ok")
    store.insert([NewSample(f"odd{i}", "cat", "vector", x[i].astype("<f4").tobytes()) for i in range(20)])
    settings = make_settings(tmp_path, store.url, validation_fraction=0.0)
    data = plan_run_data(store, settings, parent_cutoff=0, data_cutoff=store.max_seq(), seed=0)
    assert data.skipped_unknown_labels == store.count(split="train", label="cat")
    assert len(data.new) == store.count(split="train") - data.skipped_unknown_labels


def test_batches_are_pinned_for_a_seed() -> None:
    """The exact mix for one seed and epoch (computed once, kept): replayed indices 5-7 cycle in a shuffled order."""
    s = MixedBatchSampler(n_new=5, n_replay=3, batch_size=4, replay_ratio=0.5, seed=3)
    assert s.batches() == [[4, 2, 5, 6], [1, 3, 7, 5], [0, 6, 7]]
    s.set_epoch(1)
    assert s.batches() == [[1, 4, 5, 6], [0, 2, 7, 5], [3, 6, 7]]
    # Fewer batches than ranks: every rank still gets one step.
    few = MixedBatchSampler(n_new=3, n_replay=2, batch_size=2, replay_ratio=0.5, seed=3, rank=1, world_size=4)
    assert few.batches() == [[1, 4]] and len(few) == 1


def test_sampler_argument_edges() -> None:
    assert replay_per_batch(10, 0.01, 5) == 1  # rounds to 0 replayed: at least one
    assert replay_per_batch(4, 0.9, 5) == 3  # at least one new sample
    one = MixedBatchSampler(n_new=1, n_replay=0, batch_size=1, replay_ratio=0.0, seed=0)
    assert one.batches() == [[0]] and len(one) == 1
    MixedBatchSampler(n_new=1, n_replay=3, batch_size=4, replay_ratio=0.99, seed=0, rank=1, world_size=2)
    for kw, words in [
        ({"n_new": 0}, "n_new must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"replay_ratio": 1.0}, r"replay_ratio must be in \[0, 1\), got 1.0"),
        ({"replay_ratio": -0.1}, "replay_ratio must be in"),
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\), got 2"),
        ({"rank": -1}, "rank must be in"),
    ]:
        args = {"n_new": 4, "n_replay": 2, "batch_size": 2, "replay_ratio": 0.5, "seed": 0, **kw}
        with pytest.raises(ValueError, match=words):
            MixedBatchSampler(**args)  # type: ignore[arg-type]


def test_strategies_and_class_balance() -> None:
    assert [(uses_replay(s), uses_ewc(s)) for s in ("naive", "replay", "ewc", "replay+ewc")] == [
        (False, False), (True, False), (False, True), (True, True),
    ]  # fmt: skip
    for f in (uses_replay, uses_ewc):
        with pytest.raises(ValueError, match=r"training\.strategy must be one of"):
            f("ewc+replay")
    assert class_balance(["b", "a", "b", "c", "b"]) == {"b": 3, "a": 1, "c": 1}
    assert class_balance([]) == {}
