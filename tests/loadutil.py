"""Load against a real server: feedback and predict client threads that record what was acknowledged.

    with Load(url, feeders=8, predictors=4, tag="run1") as load:
        time.sleep(30)
    assert not load.server_errors()
    assert stored_ids(db_url) >= load.acked

A feedback batch is acknowledged only by a 200; a batch whose request died with
the server (kill -9) is "unknown": it may or may not be stored, but never in part.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable

import httpx
import numpy as np
from sqlalchemy import create_engine, text
from testkit import digit_arrays, digit_samples


def percentile(values: Iterable[float], q: float) -> float:
    data = np.asarray(list(values), dtype=float)
    return float(np.percentile(data, q)) if data.size else float("nan")


class Load:
    """``feeders`` feedback threads (batches of ``batch`` samples) and ``predictors`` predict threads."""

    def __init__(
        self,
        url: str,
        *,
        feeders: int = 8,
        predictors: int = 4,
        batch: int = 10,
        tag: str = "load",
        pause: float = 0.0,
    ) -> None:
        self.url, self.feeders, self.predictors, self.batch, self.tag = url, feeders, predictors, batch, tag
        self.pause = pause  # seconds each feeder waits between its batches
        self.acked: set[str] = set()  # ids in a batch answered 200
        self.unknown: set[str] = set()  # ids in a batch whose request got no answer
        self.rejected: set[str] = set()  # ids in a batch answered with an error status
        self.statuses: Counter[tuple[str, int]] = Counter()  # (route, status) -> count; status 0: no answer
        self.bodies: list[tuple[str, int, str]] = []  # error answers, for the assertion message
        self.latencies: list[float] = []  # seconds, predict requests answered 200
        self.versions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._feed, args=(i,), daemon=True) for i in range(self.feeders)]
        self._threads += [
            threading.Thread(target=self._predict, args=(i,), daemon=True) for i in range(self.predictors)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def server_errors(self) -> dict[tuple[str, int], int]:
        return {k: v for k, v in self.statuses.items() if k[1] >= 500}

    def _record(self, route: str, status: int, body: str = "") -> None:
        with self._lock:
            self.statuses[(route, status)] += 1
            if status >= 400 and len(self.bodies) < 20:
                self.bodies.append((route, status, body[:300]))

    def _feed(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            k = 0
            while not self._stop.is_set():
                samples = digit_samples(prefix=f"{self.tag}-f{worker}", start=k * self.batch, stop=(k + 1) * self.batch)
                k += 1
                ids = {s["id"] for s in samples}
                try:
                    r = http.post("/v1/feedback", json={"samples": samples})
                except httpx.TransportError:
                    with self._lock:
                        self.unknown |= ids
                        self.statuses[("feedback", 0)] += 1
                    time.sleep(0.2)  # the server is gone or restarting
                    continue
                self._record("feedback", r.status_code, r.text if r.status_code != 200 else "")
                with self._lock:
                    (self.acked if r.status_code == 200 else self.rejected).update(ids)
                if self.pause:
                    self._stop.wait(self.pause)

    def _predict(self, worker: int) -> None:
        rng = np.random.default_rng(worker)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                x, _ = digit_arrays()
                rows = rng.integers(0, len(x), 4)
                started = time.perf_counter()
                try:
                    r = http.post("/v1/predict", json={"inputs": [{"x": x[i].tolist()} for i in rows]})
                except httpx.TransportError:
                    self._record("predict", 0)
                    time.sleep(0.2)
                    continue
                elapsed = time.perf_counter() - started
                self._record("predict", r.status_code, r.text if r.status_code != 200 else "")
                if r.status_code == 200:
                    with self._lock:
                        self.latencies.append(elapsed)
                        self.versions[r.json()["model_version"]] += 1
                else:
                    time.sleep(0.1)  # no model yet (503 no_model): do not spin


def stored_id_counts(db_url: str, prefix: str = "") -> Counter[str]:
    """external_id -> number of rows with it (read straight from the database, not through the service)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT external_id, COUNT(*) FROM samples WHERE external_id LIKE :p GROUP BY external_id"),
                {"p": prefix + "%"},
            ).all()
    finally:
        engine.dispose()
    return Counter({r[0]: int(r[1]) for r in rows})
