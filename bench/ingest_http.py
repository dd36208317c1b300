"""HTTP ingest throughput vs. raw SQLite inserts of the same rows, measured in one run.

20,000 vector samples (64 floats) in batches of 100 from 4 client threads to a
real `continual serve` on loopback (SQLite store), then the same rows through
sqlite3.executemany, one transaction per 100 rows (what a 200 promises) and in
one transaction. Prints samples/s and the ratios. Target: ratio >= 0.05.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's ServerProcess: one way to run a real server

from serverutil import ServerProcess  # noqa: E402

from continual.store import split_of  # noqa: E402

N, BATCH, THREADS, DIM = 20_000, 100, 4, 64


def make_rows() -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIM)).astype(np.float32)
    return x, [f"bench-{i}" for i in range(N)], [str(i % 10) for i in range(N)]


def http_run(x: np.ndarray, ids: list[str], labels: list[str], workdir: Path) -> tuple[float, int]:
    server = ServerProcess({"service": {"log_level": "warning"}}, workdir=workdir)
    server.start()
    bodies = [
        json.dumps(
            {"samples": [{"id": ids[i], "label": labels[i], "x": x[i].tolist()} for i in range(s, min(s + BATCH, N))]}
        ).encode()
        for s in range(0, N, BATCH)
    ]
    accepted = [0] * THREADS
    errors: list[str] = []

    def worker(t: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers={"Content-Type": "application/json"}) as http:
            for body in bodies[t::THREADS]:
                r = http.post("/v1/feedback", content=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                accepted[t] += r.json()["accepted"]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    server.stop()
    if errors:
        raise SystemExit(f"HTTP ingest failed: {errors[0]}")
    return elapsed, sum(accepted)


def sqlite_run(x: np.ndarray, ids: list[str], labels: list[str], path: Path, per_batch: bool) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE samples (seq INTEGER PRIMARY KEY AUTOINCREMENT, external_id VARCHAR(255) NOT NULL UNIQUE, "
        "label VARCHAR(255) NOT NULL, kind VARCHAR(16) NOT NULL, sha256 VARCHAR(64) NOT NULL, payload BLOB NOT NULL, "
        "split VARCHAR(16) NOT NULL, ingested_at DATETIME NOT NULL, source VARCHAR(255) NOT NULL, meta JSON)"
    )
    conn.execute("CREATE INDEX ix_split_seq ON samples (split, seq)")
    conn.execute("CREATE INDEX ix_label_seq ON samples (label, seq)")
    sql = "INSERT INTO samples (external_id, label, kind, sha256, payload, split, ingested_at, source, meta) VALUES (?,?,?,?,?,?,?,?,?)"
    start = time.perf_counter()
    # Rows are built inside the timing (hash, split, bytes), as the service must build them too.
    step = BATCH if per_batch else N
    for s in range(0, N, step):
        now = datetime.now(UTC).isoformat()
        rows = []
        for i in range(s, min(s + step, N)):
            payload = x[i].astype("<f4").tobytes()
            rows.append(
                (
                    ids[i],
                    labels[i],
                    "vector",
                    hashlib.sha256(payload).hexdigest(),
                    payload,
                    split_of(ids[i], 0.2),
                    now,
                    "bench",
                    None,
                )
            )
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    (n,) = conn.execute("SELECT COUNT(*) FROM samples").fetchone()
    conn.close()
    if n != N:
        raise SystemExit(f"sqlite baseline stored {n} rows, expected {N}")
    return elapsed


def main() -> None:
    x, ids, labels = make_rows()
    with tempfile.TemporaryDirectory(prefix="continual-bench-") as tmp:
        t_http, accepted = http_run(x, ids, labels, Path(tmp) / "server")
        if accepted != N:
            raise SystemExit(f"server accepted {accepted} of {N}")
        t_batch = sqlite_run(x, ids, labels, Path(tmp) / "raw-batch.db", per_batch=True)
        t_one = sqlite_run(x, ids, labels, Path(tmp) / "raw-one.db", per_batch=False)
    http_rate, batch_rate, one_rate = N / t_http, N / t_batch, N / t_one
    print(
        f"http ingest:      {N} samples, batches of {BATCH}, {THREADS} threads: {http_rate:,.0f} samples/s ({t_http:.2f}s)"
    )
    print(f"sqlite3 baseline: executemany, one commit per {BATCH} rows: {batch_rate:,.0f} samples/s ({t_batch:.2f}s)")
    print(f"sqlite3 baseline: executemany, one commit for all rows:  {one_rate:,.0f} samples/s ({t_one:.2f}s)")
    print(f"ratio http / sqlite (commit per batch): {http_rate / batch_rate:.3f}  (target >= 0.05)")
    print(f"ratio http / sqlite (single commit):    {http_rate / one_rate:.3f}")


if __name__ == "__main__":
    main()
