"""The classes table: first sightings, counts from the samples, the max_classes limit, migration 0004."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import insert

from continual.store import ClassLimit, NewSample, Store, TooManyClasses
from continual.store.engine import write_tx
from continual.store.migrate import downgrade
from continual.store.schema import samples


def sample(i: int, label: str) -> NewSample:
    return NewSample(f"id{i}", label, "vector", np.full(4, i, dtype=np.float32).tobytes())


def test_first_sighting_and_counts_per_split(store: Store) -> None:
    t1, t2 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    store.insert([sample(i, "cat" if i % 2 else "dog") for i in range(40)], now=t1)
    store.insert([sample(100 + i, "fox") for i in range(10)] + [sample(200, "cat")], now=t2)
    rows = {r.label: r for r in store.classes.rows()}
    assert store.classes.names() == ["dog", "cat", "fox"]  # by first sighting (then first seq)
    assert rows["fox"].first_seen_at.replace(tzinfo=UTC) == t2 and rows["cat"].first_seen_at.replace(tzinfo=UTC) == t1
    assert rows["fox"].first_seq == 41 and rows["dog"].first_seq == 1  # fox's first sample is the 41st stored
    for label, r in rows.items():
        assert (r.train, r.holdout) == (
            store.count(label=label, split="train"),
            store.count(label=label, split="holdout"),
        )
        assert r.samples == store.label_counts()[label]
    # Configured classes come first, in their order, with or without samples; excluded samples do not count.
    store.exclude(["id100", "id101"])
    listed = store.classes.rows(["fox", "owl"])
    assert [r.label for r in listed] == ["fox", "owl", "dog", "cat"]
    assert listed[0].samples == 8 and (listed[1].samples, listed[1].first_seen_at) == (0, None)


def test_the_limit_refuses_a_batch_whose_new_labels_do_not_fit(store: Store) -> None:
    limit = ClassLimit(4, ("cat", "dog", "owl"))
    store.insert([sample(1, "cat"), sample(2, "fox")], class_limit=limit)  # cat, dog, owl + fox = 4
    with pytest.raises(TooManyClasses) as e:
        store.insert([sample(3, "cat"), sample(4, "emu"), sample(5, "emu")], class_limit=limit)
    assert e.value.labels == ["emu"] and [d["index"] for d in e.value.details] == [1, 2]
    assert store.count() == 2 and store.classes.names() == ["cat", "fox"]  # nothing of the batch was stored
    store.insert([sample(6, "owl"), sample(7, "fox")], class_limit=limit)  # configured and known labels fit
    store.insert([sample(8, "emu")])  # no limit: the importer and the benchmarks store anything
    assert store.classes.names() == ["cat", "fox", "owl", "emu"]


def test_concurrent_batches_cannot_both_take_the_last_place(store_url: str) -> None:
    stores = [Store(store_url) for _ in range(6)]
    stores[0].upgrade()
    limit = ClassLimit(4, ("a", "b"))
    outcomes: list[str] = []
    barrier = threading.Barrier(len(stores))

    def send(k: int) -> None:
        barrier.wait()
        try:
            stores[k].insert([sample(k, f"new{k}")], class_limit=limit)
            outcomes.append("stored")
        except TooManyClasses:
            outcomes.append("refused")

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 4 + ["stored"] * 2
    assert len(stores[0].classes.names()) == 2 == stores[0].count()
    for s in stores:
        s.dispose()


def test_migration_0005_records_every_label_already_stored(store_url: str) -> None:
    store = Store(store_url)
    store.upgrade("0002")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with write_tx(store.engine) as conn:
        for i, label in enumerate(["b", "a", "b", "c"]):
            conn.execute(
                insert(samples).values(
                    external_id=f"x{i}", label=label, kind="vector", sha256="0" * 64, payload=b"1234",
                    split="train", ingested_at=now, source="", meta=None, excluded=label == "c",
                )
            )  # fmt: skip
    store.upgrade()
    rows = {r.label: r for r in store.classes.rows()}
    assert [r.label for r in store.classes.rows()] == ["b", "a", "c"]  # same time: by first seq
    assert (rows["b"].first_seq, rows["b"].train) == (1, 2) and (rows["c"].samples, rows["c"].first_seq) == (0, 4)
    downgrade(store.engine, "0002")
    store.upgrade()
    assert store.classes.names() == ["b", "a", "c"]
    store.dispose()
