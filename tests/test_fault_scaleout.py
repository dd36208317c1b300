"""Two ``continual serve`` processes on one PostgreSQL schema and one model directory.

Both ingest and serve; exactly one trains at a time (the trainer lease). A process
that (re)starts while the other trains must not interrupt the other's run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import pg_schema_url
from looputil import LOOP_CONFIG
from serverutil import ServerProcess
from sqlalchemy import text
from testkit import digit_samples, merge, wait_for

from continual.store import Store
from continual.store.runs import FINISHED

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


class Watcher:
    """Samples the active runs and the lease holder every 0.1 s from a third connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.max_active = 0
        self.holders: set[str] = set()
        self.running: dict[int, set[str]] = {}  # run id -> lease holders seen while it ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with self.store.engine.connect() as conn:
                active = conn.execute(
                    text("SELECT id, status FROM training_runs WHERE status IN ('pending','running')")
                )
                active = active.all()
                holder = conn.execute(
                    text("SELECT holder FROM leases WHERE name = 'trainer' AND expires_at > now()")
                ).scalar()
            self.max_active = max(self.max_active, len(active))
            if holder:
                self.holders.add(holder)
            for run_id, status in active:
                if status == "running":
                    self.running.setdefault(run_id, set()).add(holder or "")


def pid_of(holder: str) -> int:
    return int(holder.rpartition(":")[2])


def test_two_services_share_the_store_and_one_trains(tmp_path: Path, pg_schema: str) -> None:
    url = pg_schema_url(pg_schema)
    config = merge(
        LOOP_CONFIG,
        {
            "service": {"data_dir": str(tmp_path / "shared")},
            "serving": {"poll_interval_seconds": 1},
            # Runs of tens of seconds (no early stop), so the restart (several seconds) lands inside one
            # even on an idle machine.
            "training": {"epochs": 1500, "early_stopping_patience": 100000},
        },
    )
    a = ServerProcess(config, workdir=tmp_path / "a", env={"CONTINUAL_STORE__URL": url})
    b = ServerProcess(config, workdir=tmp_path / "b", env={"CONTINUAL_STORE__URL": url})
    store = Store(url)
    servers = [a, b]
    try:
        a.start()
        b.start()
        pids = {s.proc.pid for s in servers if s.proc is not None}
        with Watcher(store) as watch:
            # Both ingest: alternate the batches between them.
            for i, k in enumerate(range(0, 400, 50)):
                r = httpx.post(
                    servers[i % 2].url + "/v1/feedback",
                    json={"samples": digit_samples(prefix="s", start=k, stop=k + 50)},
                )
                assert r.status_code == 200, r.text
            champion = wait_for(lambda: (v := _served(a)) and v == _served(b) and v, 180, "both serving one champion")
            predicted = {s.url: _predict(s) for s in servers}
            assert set(predicted.values()) == {champion}, predicted

            # A manual run; while it trains, the other process is killed and restarted.
            feed = digit_samples(prefix="t", stop=200)
            assert httpx.post(b.url + "/v1/feedback", json={"samples": feed}).status_code == 200
            run_id = httpx.post(a.url + "/v1/train", timeout=30).json()["run_id"]
            wait_for(lambda: store.runs.get(run_id)["status"] == "running", 120, "the run starting")
            trainer = next(s for s in servers if s.proc is not None and s.proc.pid == _lease_pid(store))
            other = b if trainer is a else a
            other.kill()
            other.start()
            assert other.proc is not None
            pids.add(other.proc.pid)
            # The restarted process's recovery left the other's run alone.
            assert store.runs.get(run_id)["status"] == "running", store.runs.get(run_id)
            row = wait_for(lambda: (r := store.runs.get(run_id))["status"] in FINISHED and r, 180, "the run finishing")
            assert row["status"] == "succeeded", row
            assert (
                httpx.post(other.url + "/v1/feedback", json={"samples": digit_samples(prefix="u", stop=10)}).status_code
                == 200
            )
        assert watch.max_active <= 1, "two runs were active at once"
        assert {pid_of(h) for h in watch.holders} <= pids, watch.holders
        for ran, holders in watch.running.items():
            assert len(holders - {""}) <= 1, f"run {ran} ran under several lease holders: {holders}"
        # One model directory: every registered version is there, written once.
        with store.engine.connect() as conn:
            versions = set(conn.execute(text("SELECT version FROM model_versions")).scalars())
        on_disk = {p.name for p in (tmp_path / "shared" / "models").iterdir()}
        assert versions and versions <= on_disk and not any(n.startswith(".tmp-") for n in on_disk), on_disk
    finally:
        for s in servers:
            s.stop()
        store.dispose()


def _served(s: ServerProcess) -> str | None:
    return httpx.get(s.url + "/v1/status", timeout=30).json()["serving_version"]


def _predict(s: ServerProcess) -> Any:
    r = httpx.post(
        s.url + "/v1/predict", json={"inputs": [{"x": digit_samples(prefix="p", stop=1)[0]["x"]}]}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def _lease_pid(store: Store) -> int | None:
    with store.engine.connect() as conn:
        holder = conn.execute(text("SELECT holder FROM leases WHERE name = 'trainer' AND expires_at > now()")).scalar()
    return pid_of(holder) if holder else None
