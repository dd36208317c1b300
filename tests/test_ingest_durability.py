"""A 200 means committed: kill -9 mid-stream and concurrent writers, against a real server."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from serverutil import ServerProcess
from sqlalchemy import create_engine, text

from continual.client import Client, FeedbackResult, vector_sample

pytestmark = pytest.mark.slow


def batch(tag: str, n: int, seed: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    return [vector_sample(rng.normal(size=64).round(4), str(i % 10), id=f"{tag}-{i}") for i in range(n)]


def stored(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(text("SELECT external_id, label FROM samples")).all())
    finally:
        engine.dispose()


def test_every_acknowledged_batch_survives_kill_9(tmp_path: Path) -> None:
    server = ServerProcess({}, workdir=tmp_path)
    server.start()
    sent: dict[str, list[dict[str, object]]] = {}
    acked: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def stream(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for k in range(10_000):
                tag = f"w{worker}-b{k}"
                samples = batch(tag, 25, seed=worker * 100_000 + k)
                with lock:
                    sent[tag] = samples
                try:
                    r = http.post("/v1/feedback", json={"samples": samples})
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code == 200:
                    with lock:
                        acked.add(tag)
                        if len(acked) >= 40 and not killed.is_set():
                            killed.set()
                            server.kill()  # SIGKILL to the whole process group, requests in flight

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert killed.is_set() and len(acked) >= 40

    server.start()  # restarts on the same data directory
    rows = stored(f"sqlite:///{tmp_path / 'data' / 'continual.db'}")
    for tag, samples in sent.items():
        present = [s["id"] in rows for s in samples]
        if tag in acked:
            assert all(present), f"batch {tag} got a 200 but is not fully stored"
            assert all(rows[s["id"]] == s["label"] for s in samples)  # type: ignore[index]
        else:
            assert all(present) or not any(present), f"batch {tag} is partly stored"
    # Resending everything after the restart completes the set and stores nothing twice.
    with Client(server.url, retries=3) as c:
        result = c.feedback([s for samples in sent.values() for s in samples], batch_size=100)
    total = sum(len(v) for v in sent.values())
    assert result.accepted + result.duplicates == total
    assert len(stored(f"sqlite:///{tmp_path / 'data' / 'continual.db'}")) == total
    server.stop()


def test_concurrent_clients_lose_nothing_and_duplicate_nothing(tmp_path: Path, store_url: str) -> None:
    server = ServerProcess({}, workdir=tmp_path, env={"CONTINUAL_STORE__URL": store_url})
    server.start()
    results: list[FeedbackResult] = []
    errors: list[BaseException] = []

    def client(worker: int) -> None:
        try:
            with Client(server.url, retries=5) as c:
                for b in range(50):
                    own = batch(f"t{worker}-b{b}", 10, seed=worker * 1000 + b)
                    shared = batch(f"shared-b{b}", 2, seed=10**6 + b)  # every thread sends these too
                    results.append(c.send_batch(own + shared))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    server.stop()
    assert not errors, errors
    assert len(results) == 8 * 50
    unique = 8 * 50 * 10 + 50 * 2
    assert sum(r.accepted for r in results) == unique
    assert sum(r.duplicates for r in results) == 8 * 50 * 12 - unique
    rows = stored(store_url)
    assert len(rows) == unique
    assert all(rows[f"t{w}-b{b}-{i}"] == str(i % 10) for w in range(8) for b in range(50) for i in range(10))
