"""The prediction log writer: ids, batching by size and time, a full queue, a failing store, the input policies."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from testkit import wait_for

from continual.config import ServingSettings
from continual.metrics import Metrics
from continual.predlog import PredictionLog, new_prediction_id, prediction_time
from continual.store import PredictionRecord


@dataclass(frozen=True)
class Answer:
    label: str
    confidence: float
    scores: dict[str, float]
    distance: float | None = None


@dataclass(frozen=True)
class Inp:
    kind: str
    payload: bytes


@dataclass
class Sink:
    """Records what the writer inserts; ``gate`` holds inserts back, ``fail`` makes them raise."""

    batches: list[list[PredictionRecord]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    fail: bool = False

    def __post_init__(self) -> None:
        self.gate.set()

    def insert(self, records: Sequence[PredictionRecord]) -> int:
        self.gate.wait(30)
        if self.fail:
            raise RuntimeError("store unavailable: test")
        self.batches.append(list(records))
        return len(records)

    @property
    def rows(self) -> list[PredictionRecord]:
        return [r for b in self.batches for r in b]


def settings(**over: object) -> ServingSettings:
    base = {"log_flush_rows": 50, "log_flush_seconds": 0.2, "log_queue_size": 1_000}
    return ServingSettings.model_validate(base | over)


def submit(log: PredictionLog, n: int, payload: bytes = b"\x01" * 256, version: str = "v1") -> list[str]:
    pids = [new_prediction_id() for _ in range(n)]
    answers = [Answer("3", 0.75, {str(c): 0.025 for c in range(10)} | {"3": 0.75}) for _ in range(n)]
    log.submit(version, pids, answers, [Inp("vector", payload)] * n)
    return pids


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_prediction_ids_sort_by_time_and_do_not_collide() -> None:
    t = 1_790_000_000.0
    pids = [new_prediction_id(t + i / 1000) for i in range(1_000)]
    assert pids == sorted(pids) and len(set(pids)) == 1_000
    same_ms = {new_prediction_id(t) for _ in range(10_000)}
    assert len(same_ms) == 10_000 and all(len(p) == 26 for p in same_ms)
    # From the clock, one process's ids strictly increase, also inside one millisecond.
    burst = [new_prediction_id() for _ in range(5_000)]
    assert burst == sorted(burst) and len(set(burst)) == 5_000
    assert abs(prediction_time(pids[500]).timestamp() - (t + 0.5)) < 0.002
    with pytest.raises(ValueError, match="not a prediction id"):
        prediction_time("01-not-an-id")


def test_rows_carry_the_answer_the_hash_and_the_top_k() -> None:
    sink = Sink()
    log = PredictionLog(sink, settings(log_top_k=3), max_payload_bytes=1_000)
    log.start()
    pids = submit(log, 5)
    assert log.flush(5)
    log.stop()
    rows = sink.rows
    assert [r.id for r in rows] == pids
    r = rows[0]
    assert (r.model_version, r.label, r.confidence, r.kind, r.input_policy) == ("v1", "3", 0.75, "vector", "all")
    assert r.payload == b"\x01" * 256 and len(r.scores or {}) == 3 and (r.scores or {})["3"] == 0.75
    import hashlib

    assert r.sha256 == hashlib.sha256(b"\x01" * 256).hexdigest()


def test_the_writer_flushes_by_size_before_the_interval_and_by_time_after_it() -> None:
    sink = Sink()
    log = PredictionLog(sink, settings(log_flush_rows=50, log_flush_seconds=30), max_payload_bytes=1_000)
    log.start()
    submit(log, 60)  # over flush_rows: written at once, not after 30 s
    wait_for(lambda: len(sink.rows) == 60, 5, "a full batch written")
    log.stop()

    sink = Sink()
    log = PredictionLog(sink, settings(log_flush_rows=1_000, log_flush_seconds=0.2), max_payload_bytes=1_000)
    log.start()
    started = time.monotonic()
    submit(log, 3)
    wait_for(lambda: len(sink.rows) == 3, 5, "a small batch written after log_flush_seconds", 0.01)
    assert 0.15 <= time.monotonic() - started < 3
    submit(log, 2)
    log.stop()  # what is buffered is written before the thread ends
    assert len(sink.rows) == 5 and len(sink.batches) == 2


def test_a_full_queue_drops_records_without_blocking_and_counts_them() -> None:
    sink = Sink()
    sink.gate.clear()  # the store hangs: the writer holds one batch, the buffer fills up
    metrics = Metrics(CollectorRegistry())
    log = PredictionLog(sink, settings(log_queue_size=100, log_flush_rows=10), max_payload_bytes=1_000, events=metrics)
    log.start()
    submit(log, 10)
    wait_for(lambda: log._buffered == 0, 5, "the writer taking the first batch", 0.01)
    started = time.perf_counter()
    dropped = [log.submit("v1", *_one_request(8)) for _ in range(20)]  # 160 records, room for 100
    elapsed = time.perf_counter() - started
    assert sum(dropped) == 60 and dropped[:12] == [0] * 12 and dropped[12] == 4
    assert elapsed < 0.5  # twenty submits against a hung store: no waiting anywhere
    assert value(metrics, "continual_prediction_log_dropped_total", reason="queue_full") == 60
    sink.gate.set()
    assert log.flush(10)
    log.stop()
    assert len(sink.rows) == 110
    assert value(metrics, "continual_prediction_log_written_total") == 110


def _one_request(n: int) -> tuple[list[str], list[Answer], list[Inp]]:
    return [new_prediction_id() for _ in range(n)], [Answer("1", 0.5, {"1": 0.5})] * n, [Inp("vector", b"\0" * 8)] * n


def test_a_failing_store_drops_the_batch_and_the_writer_goes_on() -> None:
    sink = Sink(fail=True)
    metrics = Metrics(CollectorRegistry())
    log = PredictionLog(sink, settings(), max_payload_bytes=1_000, events=metrics)
    log.start()
    submit(log, 7)
    assert log.flush(5)
    assert value(metrics, "continual_prediction_log_dropped_total", reason="store_error") == 7
    sink.fail = False
    submit(log, 4)
    assert log.flush(5)
    log.stop()
    assert len(sink.rows) == 4 and log.pending == 0


@pytest.mark.parametrize(
    ("policy", "rate", "kept"), [("all", 0.1, 400), ("none", 1.0, 0), ("sampled", 0.25, (70, 130))]
)
def test_the_input_policy_decides_which_payloads_are_kept(policy: str, rate: float, kept: object) -> None:
    sink = Sink()
    log = PredictionLog(
        sink,
        settings(log_inputs=policy, log_sample_rate=rate, log_flush_rows=1_000),
        max_payload_bytes=1_000,
        rng=random.Random(0),
    )
    log.start()
    submit(log, 400)
    log.stop()
    n = sum(r.payload is not None for r in sink.rows)
    assert len(sink.rows) == 400 and all(r.input_policy == policy for r in sink.rows)
    if isinstance(kept, tuple):
        assert kept[0] <= n <= kept[1]
    else:
        assert n == kept


def test_an_input_over_the_payload_cap_is_logged_without_it() -> None:
    sink = Sink()
    log = PredictionLog(sink, settings(), max_payload_bytes=100)
    log.start()
    submit(log, 2, payload=b"\x02" * 101)
    log.stop()
    assert [r.payload for r in sink.rows] == [None, None] and sink.rows[0].sha256


def test_flush_without_a_thread_and_stop_twice_are_harmless() -> None:
    log = PredictionLog(Sink(), settings(), max_payload_bytes=100)
    assert log.flush(0.1)
    submit(log, 1)
    assert not log.flush(0.1)  # nothing will write it: the caller hears so instead of hanging
    log.start()
    assert log.flush(5)
    log.stop()
    log.stop()
