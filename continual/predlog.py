"""The prediction log: ids for answered inputs, and the writer that stores them off the request path.

Every ``/v1/predict`` input gets a :func:`new_prediction_id` (sortable by time, unique
across replicas without coordination). The request thread hands its predictions to
:meth:`PredictionLog.submit`, which only appends to a bounded buffer; one background
thread turns them into rows (input hash, top-k scores, the input itself as the logging
policy says) and commits them in batches — ``log_flush_rows`` at once, or whatever is
there ``log_flush_seconds`` after the oldest arrived. When the buffer is full the new
records are dropped and counted, never the request; so is a batch the store refused.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from continual.config import ServingSettings
from continual.store import PredictionRecord

log = logging.getLogger("continual.predlog")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_CROCKFORD)}
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> two characters
_SHIFTS = range(120, -1, -10)
ID_LENGTH = 26


_last = [0, 0]  # (ms, random part) of the newest id this process made
_id_lock = threading.Lock()


def new_prediction_id(now: float | None = None) -> str:
    """A ULID: 48 bits of Unix milliseconds, then 80 random bits, as 26 Crockford base-32 characters.

    Ids sort by creation time (to the millisecond) and never collide in practice, whatever
    process or host made them. Within one process, ids from the clock strictly increase: one
    in the same millisecond as the one before (or after the clock stepped back) continues
    from it, +1. ``now`` (seconds) makes one for that moment, outside that sequence.

    >>> a, b = new_prediction_id(1_700_000_000.0), new_prediction_id(1_700_000_000.001)
    >>> len(a), a < b, a[:10]
    (26, True, '01HF7YAT00')
    """
    if now is not None:
        n = (int(now * 1000) << 80) | secrets.randbits(80)
    else:
        ms = int(time.time() * 1000)
        with _id_lock:
            if ms > _last[0]:
                _last[0], _last[1] = ms, secrets.randbits(80)
            else:
                ms, _last[1] = _last[0], (_last[1] + 1) & ((1 << 80) - 1)
            n = (ms << 80) | _last[1]
    return "".join([_PAIRS[(n >> s) & 1023] for s in _SHIFTS])  # 13 pairs: 130 bits, the top 2 zero


def prediction_time(prediction_id: str) -> datetime:
    """When a prediction id was made (millisecond resolution); ValueError for a malformed id."""
    if len(prediction_id) != ID_LENGTH or any(c not in _DECODE for c in prediction_id):
        raise ValueError(f"not a prediction id: {prediction_id!r}")
    ms = 0
    for c in prediction_id[:10]:
        ms = ms * 32 + _DECODE[c]
    return datetime.fromtimestamp(ms / 1000, UTC)


class Answered(Protocol):
    """What the log needs of one prediction (``continual.serving.Prediction``)."""

    @property
    def label(self) -> str: ...

    @property
    def confidence(self) -> float: ...

    @property
    def scores(self) -> Mapping[str, float]: ...

    @property
    def distance(self) -> float | None: ...


class Input(Protocol):
    """What the log needs of one decoded input (``continual.ingest.Decoded``)."""

    @property
    def kind(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class PredictionSink(Protocol):
    """Where records go (``store.predictions``)."""

    def insert(self, records: Sequence[PredictionRecord]) -> int: ...


class LogEvents(Protocol):
    """What the writer reports (``continual.metrics.Metrics`` mirrors it)."""

    def prediction_log_written(self, n: int) -> None: ...

    def prediction_log_dropped(self, n: int, reason: str) -> None: ...


@dataclass(frozen=True)
class _Entry:
    version: str
    created_at: datetime
    ids: Sequence[str]
    answers: Sequence[Answered]
    inputs: Sequence[Input]


class PredictionLog:
    """A bounded buffer of answered inputs and the one thread that writes them to the store."""

    def __init__(
        self,
        sink: PredictionSink,
        settings: ServingSettings,
        *,
        max_payload_bytes: int,
        events: LogEvents | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.sink = sink
        self.policy = settings.log_inputs
        self.sample_rate = settings.log_sample_rate
        self.top_k = settings.log_top_k
        self.capacity = settings.log_queue_size
        self.flush_rows = settings.log_flush_rows
        self.flush_seconds = settings.log_flush_seconds
        self.max_payload_bytes = max_payload_bytes
        self.events = events
        self._rng = rng or random.Random()
        self._cond = threading.Condition()
        self._reset()

    def _reset(self) -> None:
        self._buf: list[_Entry] = []
        self._buffered = 0  # records in _buf
        self._oldest = 0.0  # monotonic time the oldest buffered entry arrived
        self._submitted = 0  # records accepted into the buffer, ever
        self._done = 0  # records written or dropped by the writer, ever
        self._flush_now = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the request path ----------------------------------------------------------------
    def submit(self, version: str, ids: Sequence[str], answers: Sequence[Answered], inputs: Sequence[Input]) -> int:
        """Queue one request's predictions; returns how many were dropped because the buffer is full."""
        n = len(ids)
        with self._cond:
            room = self.capacity - self._buffered
            dropped = max(0, n - max(room, 0))
            keep = n - dropped
            if keep:
                was_empty = not self._buf
                entry = _Entry(version, datetime.now(UTC), ids[:keep], answers[:keep], inputs[:keep])
                self._buf.append(entry)
                self._buffered += keep
                self._submitted += keep
                if was_empty:
                    self._oldest = time.monotonic()
                # Wake the writer only when there is something new for it to decide on.
                if was_empty or self._buffered >= self.flush_rows:
                    self._cond.notify_all()
        if dropped:
            self._report("prediction_log_dropped", dropped, "queue_full")
        return dropped

    # -- the writer -----------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is buffered, then end the thread (waiting at most ``timeout``)."""
        with self._cond:
            thread = self._thread
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the prediction log writer did not finish within %g s", timeout)
        with self._cond:
            self._thread = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Write everything submitted so far now; True once it is written (or dropped), False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._thread is None:
                return self._done >= self._submitted
            target = self._submitted
            self._flush_now = True
            self._cond.notify_all()
            while self._done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    @property
    def pending(self) -> int:
        """Records buffered and not yet written."""
        with self._cond:
            return self._submitted - self._done

    def _take(self) -> list[_Entry] | None:
        """Wait for a batch: full, old enough, asked for, or the last one at stop. None: stopped and empty."""
        with self._cond:
            while True:
                if self._buf:
                    due = self._oldest + self.flush_seconds - time.monotonic()
                    if self._stopping or self._flush_now or self._buffered >= self.flush_rows or due <= 0:
                        break
                    self._cond.wait(due)
                elif self._stopping:
                    return None
                else:
                    self._flush_now = False
                    self._cond.wait()
            batch, self._buf, self._buffered = self._buf, [], 0
            self._flush_now = False  # a flush waits for what was submitted before it: all in this batch
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            n = sum(len(e.ids) for e in batch)
            try:
                self._write(batch, n)
            finally:
                with self._cond:
                    self._done += n
                    self._cond.notify_all()

    def _write(self, batch: Sequence[_Entry], n: int) -> None:
        try:
            self.sink.insert(self._records(batch))
        except Exception as e:  # store down or refusing: the log loses these, the service goes on
            log.warning("prediction log: %d records dropped: %s", n, e)
            self._report("prediction_log_dropped", n, "store_error")
        else:
            self._report("prediction_log_written", n)

    def _report(self, event: str, *args: object) -> None:
        if self.events is None:
            return
        try:
            getattr(self.events, event)(*args)
        except Exception:  # a metrics bug must not stop the writer
            log.exception("prediction log: reporting %s failed", event)

    def _records(self, batch: Sequence[_Entry]) -> list[PredictionRecord]:
        # Per-prediction Python work here is time the request threads wait for the GIL:
        # keep it to what each row needs (a tuple, a hash, its top-k).
        out = []
        k, policy, sha256 = self.top_k, self.policy, hashlib.sha256
        for e in batch:
            for pid, answer, inp in zip(e.ids, e.answers, e.inputs, strict=True):
                payload = inp.payload
                scores = answer.scores
                top = sorted(scores, key=scores.__getitem__, reverse=True)[:k]
                out.append(
                    PredictionRecord(
                        pid,
                        e.created_at,
                        e.version,
                        answer.label,
                        answer.confidence,
                        {c: scores[c] for c in top},
                        inp.kind,
                        sha256(payload).hexdigest(),
                        payload if self._keep(payload) else None,
                        policy,
                        answer.distance,
                    )
                )
        return out

    def _keep(self, payload: bytes) -> bool:
        if self.policy == "none" or len(payload) > self.max_payload_bytes:
            return False
        return self.policy == "all" or self._rng.random() < self.sample_rate
