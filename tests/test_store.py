from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from continual.store import IdConflict, NewSample, PayloadTooLarge, SchemaOutOfDate, Store, split_of
from continual.store.sampling import balanced_quotas

CLASSES = [str(i) for i in range(10)]


def vec_sample(i: int, label: str | None = None, value: float | None = None) -> NewSample:
    x = np.full(64, i if value is None else value, dtype=np.float32)
    return NewSample(external_id=f"s{i}", label=label or CLASSES[i % 10], kind="vector", payload=x.tobytes())


def fill(store: Store, n: int, batch: int = 500) -> None:
    for start in range(0, n, batch):
        store.insert([vec_sample(i) for i in range(start, min(n, start + batch))])


def test_insert_10k_counts_and_draws(store: Store) -> None:
    fill(store, 10_000)
    assert store.count() == 10_000
    assert store.max_seq() >= 10_000
    train, holdout = store.count(split="train"), store.count(split="holdout")
    assert train + holdout == 10_000
    assert 0.17 < holdout / 10_000 < 0.23  # holdout_fraction = 0.2
    assert store.label_counts() == {c: 1_000 for c in CLASSES}
    cutoff = store.max_seq() - 2_500
    assert store.count(after=cutoff) == 2_500
    assert store.count(upto=cutoff) == 7_500

    drawn = store.draw(300, upto=cutoff, split="train", seed=1)
    assert len(drawn) == 300 and len(set(drawn.tolist())) == 300
    rows = store.get_samples(drawn)
    assert all(r.seq <= cutoff and r.split == "train" for r in rows)
    assert np.array_equal(drawn, store.draw(300, upto=cutoff, split="train", seed=1))
    assert not np.array_equal(drawn, store.draw(300, upto=cutoff, split="train", seed=2))


def test_balanced_draw_is_balanced_even_with_a_rare_class(store: Store) -> None:
    # 9 common classes with 200 samples each, one rare class with 12.
    batch = [vec_sample(i, label=CLASSES[i % 9]) for i in range(1_800)]
    batch += [vec_sample(10_000 + i, label="9") for i in range(12)]
    for start in range(0, len(batch), 400):
        store.insert(batch[start : start + 400])
    drawn = store.draw(300, split=None, balanced=True, seed=3)
    labels = Counter(r.label for r in store.get_samples(drawn))
    assert len(drawn) == 300
    assert labels["9"] == 12  # the rare class gives all it has
    common = [labels[c] for c in CLASSES[:9]]
    assert max(common) - min(common) <= 1 and sum(common) == 288


def test_balanced_quotas() -> None:
    assert balanced_quotas([10, 10, 10], 9) == [3, 3, 3]
    assert balanced_quotas([1, 100, 100], 11) == [1, 5, 5]
    assert balanced_quotas([0, 3], 10) == [0, 3]
    assert sum(balanced_quotas([7, 2, 9, 1], 15)) == 15


def test_duplicates_are_idempotent_and_conflicts_rejected(store: Store) -> None:
    first = store.insert([vec_sample(i) for i in range(10)])
    assert (first.accepted, first.duplicates) == (10, 0)
    again = store.insert([vec_sample(i) for i in range(5, 15)])
    assert (again.accepted, again.duplicates) == (5, 5)
    assert store.count() == 15
    # Same id, other label: the whole batch is refused.
    with pytest.raises(IdConflict) as exc:
        store.insert([vec_sample(100), vec_sample(3, label="not-3")])
    assert exc.value.ids == ["s3"]
    # Same id, other payload.
    with pytest.raises(IdConflict):
        store.insert([vec_sample(4, value=42.0)])
    assert store.count() == 15


def test_duplicate_id_inside_one_batch(store: Store) -> None:
    res = store.insert([vec_sample(1), vec_sample(1), vec_sample(2)])
    assert (res.accepted, res.duplicates) == (2, 1)
    with pytest.raises(IdConflict) as exc:
        store.insert([vec_sample(7), vec_sample(7, label="other")])
    assert exc.value.ids == ["s7"]
    assert store.count() == 2


def test_payload_cap(store: Store) -> None:
    big = NewSample(external_id="big", label="0", kind="image", payload=b"\0" * (store.max_payload_bytes + 1))
    with pytest.raises(PayloadTooLarge, match="max_payload_bytes"):
        store.insert([vec_sample(1), big])
    assert store.count() == 0


def test_streaming_iteration_in_batches(store: Store) -> None:
    fill(store, 1_234)
    sizes, seqs = [], []
    for batch in store.iter_samples(batch_size=500):
        sizes.append(len(batch))
        seqs.extend(r.seq for r in batch)
    assert sizes == [500, 500, 234]
    assert seqs == sorted(seqs) and len(set(seqs)) == 1_234
    holdout = [r for b in store.iter_samples(split="holdout", batch_size=100) for r in b]
    assert all(r.split == "holdout" for r in holdout) and len(holdout) == store.count(split="holdout")
    row = store.get_samples([seqs[7]])[0]
    assert np.frombuffer(row.payload, dtype=np.float32)[0] == 7.0


def test_split_is_a_stable_function_of_the_id(store: Store, store_url: str) -> None:
    fill(store, 200)
    stored = {r.external_id: r.split for b in store.iter_samples() for r in b}
    assert all(split_of(i, 0.2) == s for i, s in stored.items())
    # A fresh interpreter (another process) computes the same splits.
    code = (
        "import json,sys; from continual.store import split_of; "
        "print(json.dumps({i: split_of(i, 0.2) for i in json.loads(sys.argv[1])}))"
    )
    import json

    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(stored))], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == stored


def test_split_of_known_values() -> None:
    """Stored rows keep the split they got: the hash and its salt are pinned (computed once, kept)."""
    ids = [f"s{i}" for i in range(40)]
    assert [i for i in ids if split_of(i, 0.2) == "holdout"] == ["s1", "s6", "s9", "s10", "s32"]
    assert [i for i in ids if split_of(i, 0.5) == "holdout"] == [
        "s1", "s3", "s6", "s8", "s9", "s10", "s11", "s18", "s19", "s22", "s28", "s30", "s32", "s37", "s39",
    ]  # fmt: skip
    assert {split_of(i, 0.0) for i in ids} == {"train"}
    assert {split_of(i, 1.0) for i in ids} == {"holdout"}


def test_migration_from_empty_and_refusal_when_behind(store_url: str) -> None:
    store = Store(store_url)
    with pytest.raises(SchemaOutOfDate, match="continual db upgrade"):
        store.check_schema()
    store.upgrade()
    assert store.revision() == store.head()
    store.check_schema()
    from continual.store.migrate import downgrade

    downgrade(store.engine, "base")
    assert store.revision() is None
    with pytest.raises(SchemaOutOfDate, match="continual db upgrade"):
        store.check_schema()
    store.upgrade()
    store.check_schema()
    store.dispose()


def test_events(store: Store) -> None:
    store.records.add_event("test", "hello", {"n": 1})
    [event] = store.records.events()
    assert event["kind"] == "test" and event["data"] == {"n": 1}


def test_an_exclusion_commits_with_its_event_or_not_at_all(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import continual.store.samples as written

    fill(store, 10)

    def unwritable(*_args: object) -> None:
        raise RuntimeError("the events table cannot be written")

    with monkeypatch.context() as m:
        m.setattr(written, "_event", unwritable)
        with pytest.raises(RuntimeError, match="events table"):
            store.exclude(["s1", "s2"], reason="poisoned", actor="token:abc")
    assert store.count() == 10 and store.records.events(kind="samples_excluded") == []
    if store.engine.dialect.name == "postgresql":
        # What a NUL in the reason did before ids and reasons were validated: the event fails, so must the exclusion.
        with pytest.raises(Exception, match=r"(?i)nul|0x00"):
            store.exclude(["s1"], reason="a\x00b", actor="t")
        assert store.count() == 10
    assert store.exclude(["s1", "s2", "nope"], reason="poisoned", actor="token:abc") == (2, ["nope"])
    [event] = store.records.events(kind="samples_excluded")
    assert event["message"] == "2 samples excluded by token:abc: poisoned"
    assert event["data"] == {
        "ids": ["s1", "s2", "nope"],
        "n": 2,
        "unknown": ["nope"],
        "reason": "poisoned",
        "actor": "token:abc",
    }
    assert store.count() == 8


def test_excluded_samples_count_for_nothing(store: Store) -> None:
    fill(store, 100)
    changed, unknown = store.exclude(["s1", "s2", "s3", "nope"])
    assert (changed, unknown) == (3, ["nope"])
    assert store.exclude(["s1"]) == (0, [])  # idempotent
    assert store.count() == 97
    assert sum(store.split_label_counts().values()) == 97
    assert sum(store.label_counts().values()) == 97
    seqs = [r.seq for b in store.iter_samples() for r in b]
    assert len(seqs) == 97
    assert len(store.draw(1_000, split=None)) == 97
    excluded_seq = 2  # s1 was the second insert
    assert all(r.external_id not in ("s1", "s2", "s3") for r in store.get_samples(range(1, 101)))
    assert store.get_samples([excluded_seq]) == []
    # Re-sending an excluded sample is a duplicate, not a new sample.
    assert store.insert([vec_sample(1)]).duplicates == 1
    assert store.count() == 97


def test_an_exhausted_pool_is_store_unavailable_not_a_crash(store_url: str) -> None:
    from continual.store import StoreUnavailable
    from continual.store.engine import EngineOptions

    if store_url.startswith("sqlite"):
        pytest.skip("SQLite opens a connection per use; the pool limit is PostgreSQL's")
    store = Store(store_url, options=EngineOptions(pool_size=1, pool_timeout=0.5))
    store.upgrade()
    held = [store.engine.connect(), store.engine.connect()]  # pool_size + overflow
    try:
        with pytest.raises(StoreUnavailable, match="no free store connection"):
            store.count()
    finally:
        for c in held:
            c.close()
    assert store.count() == 0
    store.dispose()


def test_a_small_draw_from_a_large_range_probes_instead_of_reading_it(store: Store) -> None:
    fill(store, 20_000)
    excluded = [f"s{i}" for i in range(0, 20_000, 7)]
    store.exclude(excluded)
    out = store.draw(300, split=None, seed=3)
    assert len(out) == len(set(out.tolist())) == 300 and np.all(np.diff(out) > 0)
    in_play = {r.seq for batch in store.iter_samples(seqs=out.tolist()) for r in batch}
    assert in_play == set(out.tolist())  # every drawn seq is stored and not excluded
    np.testing.assert_array_equal(out, store.draw(300, split=None, seed=3))  # seeded
    assert not np.array_equal(out, store.draw(300, split=None, seed=4))
    # Uniform over the range: ten equal bins of seqs each get about a tenth.
    counts = np.histogram(out, bins=10, range=(1, store.max_seq() + 1))[0]
    assert counts.min() >= 12 and counts.max() <= 50, counts
    holdout = store.draw(200, split="holdout", upto=15_000, seed=1)
    assert len(holdout) == 200 and holdout.max() <= 15_000
    assert {r.split for b in store.iter_samples(seqs=holdout.tolist()) for r in b} == {"holdout"}


def test_a_draw_costs_about_the_same_from_2k_and_from_40k_rows(tmp_path: Path) -> None:
    from sqlalchemy import event

    def steps(n: int) -> int:
        s = Store(f"sqlite:///{tmp_path / f'{n}.db'}")
        s.upgrade()
        fill(s, n, batch=2_000)
        count = [0]

        def on_checkout(dbapi_conn, _record, _proxy) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1) or 0, 100)

        s.engine.dispose()
        event.listen(s.engine, "checkout", on_checkout)
        assert len(s.draw(200, split=None, seed=0)) == 200
        s.dispose()
        return count[0]

    small, large = steps(2_000), steps(40_000)
    # SQLite VM steps (x100): the work, not the wall clock. Reading 40k rows would cost ~20x 2k.
    assert large <= small * 1.5 + 20, (small, large)


def test_sqlite_commits_are_fsynced_by_default_and_normal_is_a_choice(tmp_path: Path) -> None:
    """2xx means durable: a SQLite store commits with synchronous=FULL unless [store] says NORMAL."""
    from sqlalchemy import text

    from continual.config import load_settings
    from continual.store.engine import EngineOptions

    def level(store: Store) -> int:
        with store.engine.connect() as conn:
            return int(conn.execute(text("PRAGMA synchronous")).scalar_one())

    default = Store(f"sqlite:///{tmp_path / 'a.db'}")
    relaxed = Store(f"sqlite:///{tmp_path / 'b.db'}", options=EngineOptions(sqlite_synchronous="NORMAL"))
    configured = load_settings(None, env={"CONTINUAL_SERVICE__DATA_DIR": str(tmp_path / "c")})
    from_config = Store.from_settings(configured)
    try:
        assert configured.store.sqlite_synchronous == "FULL"
        assert (level(default), level(relaxed), level(from_config)) == (2, 1, 2)  # FULL = 2, NORMAL = 1
    finally:
        for s in (default, relaxed, from_config):
            s.dispose()
