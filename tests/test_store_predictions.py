"""The prediction log and the accuracy windows (``store.predictions``) on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import inspect

from continual.predlog import new_prediction_id
from continual.store import IdConflict, NewSample, PredictionRecord, Store
from continual.store.schema import accuracy_windows, predictions

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def record(pid: str, *, at: datetime = T0, version: str = "v1", label: str = "3", conf: float = 0.9,
           payload: bytes | None = b"\x00" * 256, policy: str = "all") -> PredictionRecord:  # fmt: skip
    return PredictionRecord(
        id=pid, created_at=at, model_version=version, label=label, confidence=conf,
        scores={label: conf, "1": 1 - conf}, kind="vector", sha256="ab" * 32, payload=payload, input_policy=policy,
    )  # fmt: skip


def ids(n: int, start: float = 1_790_000_000.0) -> list[str]:
    """Increasing prediction ids, one millisecond apart."""
    return [new_prediction_id(start + i / 1000) for i in range(n)]


def by_reference(pid: str, label: str, *, sample_id: str | None = None, at: datetime = T0) -> NewSample:
    return NewSample(
        external_id=sample_id or f"prediction:{pid}", label=label, kind="vector", payload=b"\x00" * 256,
        prediction_id=pid, predicted_at=at,
    )  # fmt: skip


def test_the_migration_creates_what_the_schema_declares(store: Store) -> None:
    insp = inspect(store.engine)
    for table in (predictions, accuracy_windows):
        assert {c["name"] for c in insp.get_columns(table.name)} == {c.name for c in table.c}
        assert {i["name"] for i in insp.get_indexes(table.name)} == {i.name for i in table.indexes}


def test_a_batch_round_trips_and_unknown_ids_are_absent(store: Store) -> None:
    pids = ids(1_200)  # more than one IN (...) chunk
    store.predictions.insert([record(p, payload=None if i % 2 else bytes([i % 256]) * 256) for i, p in enumerate(pids)])
    got = store.predictions.get_many([*pids, "01NOPE", pids[0]])
    assert len(got) == 1_200 and "01NOPE" not in got
    first, second = got[pids[0]], got[pids[1]]
    assert first.payload == b"\x00" * 256 and second.payload is None
    assert first.created_at == T0 and first.model_version == "v1" and first.label == "3"
    assert first.input_policy == "all" and first.true_label is None and first.labeled_at is None
    assert store.predictions.scores(pids[0]) == {"3": 0.9, "1": pytest.approx(0.1)}
    assert store.predictions.count() == 1_200 and store.predictions.count(labeled=True) == 0


def test_a_sample_built_from_a_prediction_labels_it_once(store: Store) -> None:
    pids = ids(3)
    store.predictions.insert([record(p) for p in pids])
    result = store.insert([by_reference(pids[0], "3"), by_reference(pids[1], "5")])
    assert (result.accepted, result.duplicates) == (2, 0)
    assert result.labeled == ((pids[0], T0), (pids[1], T0))
    got = store.predictions.get_many(pids)
    assert got[pids[0]].true_label == "3" and got[pids[0]].sample_id == f"prediction:{pids[0]}"
    assert got[pids[1]].true_label == "5" and got[pids[1]].labeled_at is not None
    assert got[pids[2]].true_label is None
    # The same label again: a duplicate, nothing labeled twice.
    again = store.insert([by_reference(pids[0], "3")])
    assert (again.accepted, again.duplicates, again.labeled) == (0, 1, ())
    # Another label: a conflict, nothing changes.
    with pytest.raises(IdConflict):
        store.insert([by_reference(pids[0], "4")])
    # Under another sample id it is stored, but the prediction keeps its first label.
    other = store.insert([by_reference(pids[0], "4", sample_id="reviewer-2")])
    assert other.accepted == 1
    assert store.predictions.get_many([pids[0]])[pids[0]].true_label == "3"
    [row] = [r for b in store.iter_samples() for r in b if r.external_id == f"prediction:{pids[0]}"]
    assert row.payload == b"\x00" * 256 and row.label == "3"


def test_live_outcomes_count_the_most_recently_labeled_per_version(store: Store) -> None:
    pids = ids(30)
    store.predictions.insert([record(p, version="v1" if i < 20 else "v2", label="3") for i, p in enumerate(pids)])
    # v1: 20 labels, the first 10 wrong, the last 10 right; v2: 5 labels, all wrong.
    for i, p in enumerate(pids[:25]):
        store.insert([by_reference(p, "3" if 10 <= i < 20 else "7")])
    out = store.predictions.outcomes_by_version(["v1", "v2", "v3"], last=10)
    assert (out["v1"].n_labeled, out["v1"].n_correct) == (10, 10)
    assert (out["v2"].n_labeled, out["v2"].n_correct) == (5, 0) and out["v2"].true_labels == {"7"}
    assert out["v3"].n_labeled == 0
    assert store.predictions.outcomes_by_version(["v1"], last=100)["v1"].n_correct == 10


def test_retention_by_age_and_by_count(store: Store) -> None:
    old = ids(10, start=1_700_000_000.0)
    new = ids(30)
    store.predictions.insert([record(p, at=T0 - timedelta(days=40)) for p in old])
    store.predictions.insert([record(p) for p in new])
    store.predictions.add_window(version="v1", ids=(old[0], old[-1]), times=(T0 - timedelta(days=40),) * 2,
                                 n=10, estimates={"atc": 0.9}, flags=[])  # fmt: skip
    store.predictions.add_window(version="v1", ids=(new[0], new[9]), times=(T0, T0), n=10, estimates={}, flags=[])
    store.predictions.add_window(version="v1", ids=(new[20], new[29]), times=(T0, T0), n=10, estimates={}, flags=[])
    deleted = store.predictions.apply_retention(max_age_seconds=30 * 86_400, max_rows=20, now=T0)
    assert deleted == 10 + 10
    left = store.predictions.get_many(old + new)
    assert sorted(left) == new[10:]  # the newest 20
    # Windows whose predictions are gone go too.
    assert [(w["first_id"], w["last_id"]) for w in store.predictions.windows()] == [(new[20], new[29])]
    assert store.predictions.apply_retention(max_age_seconds=30 * 86_400, max_rows=20, now=T0) == 0


def test_windows_close_in_id_order_and_count_their_labels(store: Store) -> None:
    pids = ids(25)
    store.predictions.insert([record(p, conf=0.5 + i / 100, at=T0 + timedelta(seconds=i)) for i, p in enumerate(pids)])
    store.predictions.insert([record(new_prediction_id(), version="v2")])  # another version: not in v1's windows
    rows = store.predictions.unwindowed("v1", after_id=None, before=T0 + timedelta(seconds=22), limit=100)
    assert [r[0] for r in rows] == pids[:22]  # the newest are left to settle
    assert rows[3][2] == pytest.approx(0.53) and rows[3][1] == T0 + timedelta(seconds=3)
    wid = store.predictions.add_window(
        version="v1", ids=(pids[0], pids[9]), times=(rows[0][1], rows[9][1]), n=10,
        estimates={"atc": 0.8, "confidence": None}, flags=["drift: mmd"],
    )  # fmt: skip
    after = store.predictions.unwindowed("v1", after_id=pids[9], before=T0 + timedelta(days=1), limit=100)
    assert [r[0] for r in after] == pids[10:]
    for i in (0, 1, 2, 12):  # three labels in the window (one wrong, one of a class the model lacks), one after it
        store.insert([by_reference(pids[i], {0: "3", 1: "8", 2: "cat", 12: "3"}[i])])
    [w] = store.predictions.windows(version="v1")
    assert w["id"] == wid and w["estimates"] == {"atc": 0.8, "confidence": None} and w["flags"] == ["drift: mmd"]
    assert w["first_at"] == T0 and (w["n_labeled"], w["n_correct"]) == (0, 0)
    outcome = store.predictions.window_outcomes([w])[wid]
    assert (outcome.n_labeled, outcome.n_correct, outcome.true_labels) == (3, 1, {"3", "8", "cat"})
    store.predictions.set_outcomes({wid: (outcome, ["cat"])})
    w = store.predictions.last_window("v1")
    assert w is not None and (w["n_labeled"], w["n_correct"], w["unknown_labels"]) == (3, 1, ["cat"])
    assert w["realized_at"] is not None
    assert store.predictions.last_window("v2") is None


def test_labels_arriving_concurrently_with_inputs_of_the_same_ids_are_one_sample(store: Store) -> None:
    # The same prediction labeled twice in one batch: a duplicate inside the batch, labeled once.
    [pid] = ids(1)
    store.predictions.insert([record(pid)])
    result = store.insert([by_reference(pid, "3"), by_reference(pid, "3")])
    assert (result.accepted, result.duplicates, len(result.labeled)) == (1, 1, 1)
    assert np.frombuffer(store.get_samples([1])[0].payload, "<f4").shape == (64,)


def test_tuple_rows_go_in_by_column_name_whatever_their_order(store: Store) -> None:
    from continual.store.bulk import insert_rows
    from continual.store.engine import write_tx

    names = tuple(reversed([c.name for c in predictions.c]))  # not the table's order
    row = dict(id=ids(1)[0], created_at=T0, model_version="v1", label="3", confidence=0.5, distance=None,
               scores=None, kind="vector", sha256="ab" * 32, payload=None, input_policy="none",
               true_label=None, labeled_at=None, sample_id=None)  # fmt: skip
    with write_tx(store.engine) as conn:
        insert_rows(conn, predictions, [tuple(row[n] for n in names)], columns=names)
    got = store.predictions.get_many([row["id"]])[row["id"]]
    assert (got.created_at, got.label, got.confidence, got.input_policy) == (T0, "3", 0.5, "none")
    with (
        pytest.raises(ValueError, match="insert into predictions: no value for column"),
        write_tx(store.engine) as conn,
    ):
        insert_rows(conn, predictions, [tuple(row[n] for n in names[1:])], columns=names[1:])
