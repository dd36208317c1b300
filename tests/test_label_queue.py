"""The label queue: ranking by margin, typical picks per cluster, k-center diversity, leases, the CLI export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from learnutil import make_settings

from continual.cli import main
from continual.learn.labelqueue import (
    BadQueueRequest,
    QueueItem,
    item_json,
    k_center,
    k_means,
    margin,
    next_items,
    rank,
    typical,
)
from continual.models import Classifier
from continual.predlog import new_prediction_id
from continual.store import NewSample, PredictionRecord, Store
from continual.store.labelqueue import QueueCandidate

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
CPU = torch.device("cpu")


def test_margin_is_top_minus_runner_up() -> None:
    assert margin({"a": 0.6, "b": 0.3, "c": 0.1}, 0.6) == pytest.approx(0.3)
    assert margin({"a": 0.9}, 0.9) == pytest.approx(0.8)  # the runner-up holds at most what is left
    assert margin(None, 0.7) == pytest.approx(0.4)


def test_k_center_goes_farthest_first() -> None:
    pts = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 5.0], [10.1, 0.0]])
    assert k_center(pts, 3, first=0) == [0, 4, 3]  # (10.1, 0) is the farthest; then (0, 5), not (10, 0) near it
    assert k_center(pts, 9, first=1)[:2] == [1, 4] and sorted(k_center(pts, 9, first=1)) == [0, 1, 2, 3, 4]
    assert k_center(pts, 0) == [] and k_center(np.empty((0, 2)), 3) == []
    with pytest.raises(ValueError, match="first"):
        k_center(pts, 2, first=7)


def test_rank_takes_the_uncertain_and_spreads_them_out() -> None:
    # Six near-copies of one confusing input (smallest margins) and four distinct, slightly less uncertain ones.
    margins = np.array([0.01, 0.011, 0.012, 0.013, 0.014, 0.015, 0.05, 0.06, 0.07, 0.08, 0.9, 0.95])
    emb = np.array([[0, 0]] * 6 + [[5, 0], [0, 5], [-5, 0], [0, -5], [9, 9], [-9, -9]], dtype=float)
    emb[:6] += np.arange(6)[:, None] * 1e-3
    assert rank(margins, None, 5, pool=2) == [0, 1, 2, 3, 4]  # uncertainty alone: five copies of one input
    # The pool is the 2 x 5 most uncertain (the two confident ones stay out); k-center spreads the picks.
    assert rank(margins, emb, 5, pool=2) == [0, 6, 7, 8, 9]


def _blobs(rng: np.random.Generator, centres: list[list[float]], per: int, spread: float = 0.1) -> np.ndarray:
    return np.concatenate([np.asarray(c) + spread * rng.normal(size=(per, len(c))) for c in centres])


def test_k_means_finds_separated_clusters_the_same_way_every_time() -> None:
    x = _blobs(np.random.default_rng(0), [[0, 0], [10, 0], [0, 10]], per=30)
    assign, centres = k_means(x, 3)
    assert sorted(np.bincount(assign).tolist()) == [30, 30, 30]
    assert all(len(set(assign[i : i + 30].tolist())) == 1 for i in (0, 30, 60))  # each blob is one cluster
    assert np.allclose(sorted(centres.round().tolist()), [[0, 0], [0, 10], [10, 0]])
    again, _ = k_means(x, 3)
    assert (again == assign).all()
    with pytest.raises(ValueError, match="k must be between 1 and the 90 rows"):
        k_means(x, 91)


def test_typical_takes_the_central_input_of_each_cluster_most_uncertain_first() -> None:
    # Three kinds of input, each a centre with eight inputs on a ring around it, and one odd input.
    ring = [[np.cos(a), np.sin(a)] for a in np.arange(8) * np.pi / 4]
    x = np.array([p for c in ([0, 0], [10, 0], [0, 10]) for p in [c, *(np.add(c, r) for r in ring)]] + [[3, 3]])
    margins = np.linspace(0.2, 0.9, len(x))
    margins[27] = 0.01  # the odd input is the most uncertain of all, and typical of nothing
    margins[[0, 9, 18]] = [0.5, 0.3, 0.4]
    assert typical(margins, x, 3) == [9, 18, 0]  # one per cluster, its centre, in margin order
    assert typical(margins[:2], x[:2], 3) == [1, 0]  # no more rows than k: all of them, by margin


def test_a_queue_with_a_model_picks_by_its_strategy(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # 3 kinds of input (blobs in the first two of 64 dims), 20 each; the champion embeds them as they are.
    rng = np.random.default_rng(2)
    x = np.zeros((60, 64), dtype="<f4")
    x[:, :2] = _blobs(rng, [[0, 0], [10, 0], [0, 10]], per=20)
    margins = rng.uniform(0.3, 0.9, size=60)
    margins[:8] = np.linspace(0.01, 0.08, 8)  # the eight most uncertain are all of the first kind
    records = []
    for i in range(60):
        payload = x[i].tobytes()
        top = float((1 + margins[i]) / 2)  # two classes: margin = top - (1 - top)
        records.append(
            PredictionRecord(
                id=new_prediction_id(1_790_000_000.0 + i / 1000), created_at=NOW, model_version="v1", label="0",
                confidence=top, scores={"0": top, "1": 1 - top}, kind="vector",
                sha256=hashlib.sha256(payload).hexdigest(), payload=payload, input_policy="all",
            )
        )  # fmt: skip
    store.predictions.insert(records)
    champion = Classifier(torch.nn.Identity(), torch.nn.Linear(64, 2), ["0", "1"], architecture="mlp")
    kind = {r.id: i // 20 for i, r in enumerate(records)}
    for strategy, kinds in (("typical", [0, 1, 2]), ("uncertain", [0, 0, 0])):
        settings = _settings(tmp_path, store, strategy=strategy, diversity_pool=2)
        got = next_items(store, settings, champion, settings.model.input, k=3, device=CPU, holder=strategy, now=NOW)
        assert sorted(kind[i.candidate.id] for i in got) == kinds, strategy
        assert [i.margin for i in got] == sorted(i.margin for i in got)  # most uncertain first


def _log(store: Store, n: int, *, start: float = 1_790_000_000.0, seed: int = 0, keep: bool = True) -> list[str]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        x = rng.normal(size=64).astype("<f4")
        top = float(rng.uniform(0.34, 0.99))
        payload = x.tobytes()
        records.append(
            PredictionRecord(
                id=new_prediction_id(start + i / 1000), created_at=NOW, model_version="v1", label=str(i % 3),
                confidence=top, scores={str(i % 3): top, str((i + 1) % 3): (1 - top) * 0.7}, kind="vector",
                sha256=hashlib.sha256(payload).hexdigest(), payload=payload if keep else None,
                input_policy="all" if keep else "none",
            )
        )  # fmt: skip
    store.predictions.insert(records)
    return [r.id for r in records]


def _settings(tmp_path: Path, store: Store, **queue: object):  # type: ignore[no-untyped-def]
    s = make_settings(tmp_path, store.url)
    return s.model_copy(update={"label_queue": s.label_queue.model_copy(update={"lease_seconds": 60, **queue})})


def test_queue_hands_out_the_most_uncertain_unlabeled_inputs_and_leases_them(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ids = _log(store, 40)
    settings = _settings(tmp_path, store)
    # One labeled by reference (it left the queue), one logged without its input.
    store.insert([NewSample("by-ref", "0", "vector", b"\0" * 256, prediction_id=ids[0], predicted_at=NOW)])
    [unkept] = _log(store, 1, start=1_790_000_100.0, seed=1, keep=False)
    first = next_items(store, settings, None, settings.model.input, k=5, device=CPU, holder="a", now=NOW)
    assert len(first) == 5 and not {ids[0], unkept} & {i.candidate.id for i in first}
    assert {ids[0], unkept}.isdisjoint(c.id for c in store.label_queue.candidates(limit=100, now=NOW))
    margins = sorted(i.margin for i in first)
    rest = [margin(c.scores, c.confidence) for c in store.label_queue.candidates(limit=100, now=NOW)]
    assert max(margins) <= min(rest)  # the five smallest margins went first
    assert all(i.leased_until == NOW + timedelta(seconds=60) for i in first)
    # Leased: the next request gets others; after expiry, the unlabeled ones come back.
    second = next_items(store, settings, None, settings.model.input, k=5, device=CPU, holder="b", now=NOW)
    assert not {i.candidate.id for i in first} & {i.candidate.id for i in second}
    assert store.label_queue.active(now=NOW) == 10
    later = NOW + timedelta(seconds=61)
    again = next_items(store, settings, None, settings.model.input, k=5, device=CPU, holder="c", now=later)
    assert {i.candidate.id for i in again} == {i.candidate.id for i in first}
    assert store.label_queue.active(now=later) == 5
    for bad in (0, settings.label_queue.max_k + 1):
        with pytest.raises(BadQueueRequest, match="k: must be between 1"):
            next_items(store, settings, None, settings.model.input, k=bad, device=CPU, now=NOW)


def test_two_concurrent_requests_get_disjoint_items(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _log(store, 60)
    settings = _settings(tmp_path, store)
    got: dict[str, list[QueueItem]] = {}
    barrier = threading.Barrier(2)

    def ask(name: str) -> None:
        barrier.wait()
        got[name] = next_items(store, settings, None, settings.model.input, k=20, device=CPU, holder=name, now=NOW)

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = ({i.candidate.id for i in got[n]} for n in ("a", "b"))
    assert len(a) == len(b) == 20 and not a & b  # both full: the loser of a race re-ranks what is left
    assert store.label_queue.active(now=NOW) == 40


def test_export_writes_csv_and_jsonl_with_leases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'continual.db'}"
    (tmp_path / "data").mkdir()
    store = Store(url)
    store.upgrade()
    ids = _log(store, 30)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[service]\ndata_dir = "{tmp_path / "data"}"\n[model]\narchitecture = "mlp"\nweights = "none"\n'
        'mode = "all"\n[model.input]\nkind = "vector"\nshape = [64]\n[label_queue]\nmax_k = 20\n'
    )
    out = tmp_path / "queue.csv"
    assert main(["label-queue", "export", "--config", str(cfg), "--k", "7", "--format", "csv", "-o", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 7 and set(r["prediction_id"] for r in rows) <= set(ids)
    assert len(json.loads(rows[0]["input"])) == 64 and float(rows[0]["margin"]) >= 0
    assert main(["label-queue", "export", "--config", str(cfg), "--k", "7", "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 7 and not {r["prediction_id"] for r in rows} & {r["prediction_id"] for r in lines}
    assert {"label", "confidence", "leased_until", "x"} <= set(lines[0])
    assert main(["label-queue", "export", "--config", str(cfg), "--k", "21"]) == 1
    assert "between 1 and 20" in capsys.readouterr().err
    store.dispose()


@pytest.mark.parametrize(
    ("kind", "payload", "field", "value"),
    [
        ("vector", np.array([0.5, -1.0], dtype="<f4").tobytes(), "x", [0.5, -1.0]),
        ("image", b"\x89PNG...", "image", "iVBORy4uLg=="),
        ("text", "écran noir après la mise à jour".encode(), "text", "écran noir après la mise à jour"),
    ],
)
def test_an_item_carries_its_input_as_predict_takes_it(kind: str, payload: bytes, field: str, value: object) -> None:
    c = QueueCandidate("p1", NOW, "v1", "a", 0.6, {"a": 0.6, "b": 0.4}, kind, "0" * 64, payload)
    out = item_json(QueueItem(c, 0.2, NOW + timedelta(minutes=10)))
    assert out[field] == value
    assert {"x", "image", "text"} - {field} == {"x", "image", "text"} - set(out)
    assert "text" not in item_json(QueueItem(c, 0.2, NOW), with_input=False)


def test_leases_are_timed_by_the_database_clock(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The database and this process share a host here, so this shows the queue reads the database's clock
    # (parsed on both databases) and times leases by it; skew between hosts cannot be staged without a mock.
    _log(store, 10)
    settings = _settings(tmp_path, store)
    before = store.label_queue.clock()
    assert before.tzinfo is not None and abs(before - datetime.now(UTC)) < timedelta(minutes=1)  # same host here
    got = next_items(store, settings, None, settings.model.input, k=3, device=CPU, holder="a")
    after = store.label_queue.clock()
    assert len(got) == 3 and all(before <= i.leased_until - timedelta(seconds=60) <= after for i in got)
    assert store.label_queue.active(now=after) == 3
    assert store.label_queue.active(now=after + timedelta(seconds=61)) == 0
