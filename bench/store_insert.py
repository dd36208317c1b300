"""Store insert throughput vs raw sqlite3.executemany, measured in the same run.

50,000 samples of 64 float32 values, batches of 100, one commit per batch, both
on a SQLite file with the same pragmas (WAL and the same ``synchronous``). The store
layer also checks ids for duplicates/conflicts and derives the split: that is the
cost being measured. Target: store rate >= 0.5 x raw rate.

Run twice: with ``synchronous=FULL`` (the default: a 2xx survives a power cut, every
commit waits for the disk) and ``NORMAL`` (``[store] sqlite_synchronous = "NORMAL"``:
faster; survives a crash of the process, not of the OS), so the cost of durability
is printed beside the layer's own cost.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from continual.store import NewSample, Store, split_of
from continual.store.engine import EngineOptions


def make_batches(n: int, batch: int, seed: int = 0) -> list[list[NewSample]]:
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, 64), dtype=np.float32)
    samples = [
        NewSample(external_id=f"bench-{i}", label=str(i % 10), kind="vector", payload=xs[i].tobytes()) for i in range(n)
    ]
    return [samples[i : i + batch] for i in range(0, n, batch)]


class RawSqlite:
    """The baseline: the same rows through sqlite3.executemany, no layer in between."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute(
            "CREATE TABLE samples (seq INTEGER PRIMARY KEY, external_id TEXT UNIQUE NOT NULL, label TEXT NOT NULL, "
            "kind TEXT NOT NULL, sha256 TEXT NOT NULL, payload BLOB NOT NULL, split TEXT NOT NULL, "
            "ingested_at TEXT NOT NULL, source TEXT NOT NULL, meta TEXT)"
        )
        # The same secondary index as the store's schema: the baseline pays for the same B-trees.
        self.conn.execute("CREATE INDEX ix_split ON samples (split, seq, label)")

    def insert(self, batch: list[NewSample]) -> None:
        now = datetime.now(UTC).isoformat()
        rows = [
            (s.external_id, s.label, s.kind, s.sha256, s.payload, split_of(s.external_id, 0.2), now, "", None)
            for s in batch
        ]
        self.conn.execute("BEGIN")
        self.conn.executemany(
            "INSERT INTO samples (external_id, label, kind, sha256, payload, split, ingested_at, source, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.conn.execute("COMMIT")

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM samples").fetchone()[0])


def run(tmp: Path, batches: list[list[NewSample]], synchronous: str) -> tuple[float, float]:
    """Alternate batch by batch between the two, so machine noise hits both alike."""
    raw = RawSqlite(tmp / "raw.db", synchronous)
    store = Store(f"sqlite:///{tmp / 'store.db'}", options=EngineOptions(sqlite_synchronous=synchronous))  # type: ignore[arg-type]
    store.upgrade()
    t_raw = t_store = 0.0
    for b in batches:
        t0 = time.perf_counter()
        raw.insert(b)
        t1 = time.perf_counter()
        store.insert(b)
        t2 = time.perf_counter()
        t_raw += t1 - t0
        t_store += t2 - t1
    n = sum(len(b) for b in batches)
    if raw.count() != n or store.count() != n:
        sys.exit(f"row counts differ: raw {raw.count()}, store {store.count()}, expected {n}")
    store.dispose()
    return n / t_raw, n / t_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    batches = make_batches(args.samples, args.batch)
    rates = {}
    for synchronous in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory() as tmp:
            raw, store = run(Path(tmp), batches, synchronous)
        rates[synchronous] = store
        print(f"synchronous={synchronous}")
        print(f"  raw sqlite3.executemany: {raw:,.0f} samples/s")
        print(f"  store layer:             {store:,.0f} samples/s")
        ok = "OK" if store / raw >= 0.5 else "BELOW TARGET"
        print(f"  ratio store/raw: {store / raw:.2f} (target >= 0.50) {ok}")
    print(f"durability cost: FULL stores {rates['FULL'] / rates['NORMAL']:.2f}x the samples/s of NORMAL")


if __name__ == "__main__":
    main()
