"""The store goes away under a running service: feedback 503 (nothing stored), predictions go on, it comes back.

SQLite: tests run as root, so a read-only file would not stop writes; another
connection holding the write lock (``BEGIN EXCLUSIVE``) does, past the service's
busy timeout. PostgreSQL: the service's dedicated database stops accepting
connections and its sessions are terminated, then it is let back in.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import httpx
import pytest
from loadutil import stored_id_counts
from looputil import LOOP_CONFIG
from serverutil import ServerProcess
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from testkit import digit_samples, merge, wait_for

pytestmark = pytest.mark.slow

PG_URL = os.environ.get("CONTINUAL_TEST_PG_URL", "")
CONFIG = merge(LOOP_CONFIG, {"store": {"busy_timeout_ms": 300}})


def pg_database() -> tuple[str, str]:
    name = f"continual_fault_{uuid.uuid4().hex[:10]}"
    return name, make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def pg_admin(sql: str, **params: str) -> None:
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_down_feedback_503_predict_200_then_recovers(tmp_path: Path, backend: str) -> None:
    env = {}
    if backend == "postgresql":
        if not PG_URL:
            pytest.skip("CONTINUAL_TEST_PG_URL is not set")
        dbname, url = pg_database()
        pg_admin(f'CREATE DATABASE "{dbname}"')
        env["CONTINUAL_STORE__URL"] = url
    else:
        url = f"sqlite:///{tmp_path / 'data' / 'continual.db'}"
    server = ServerProcess(CONFIG, workdir=tmp_path, env=env)
    http = httpx.Client(base_url=server.url, timeout=60)
    locker = None
    try:
        server.start()
        if backend == "sqlite":
            locker = sqlite3.connect(tmp_path / "data" / "continual.db", isolation_level=None)
        for k in (0, 100, 200):
            assert (
                http.post(
                    "/v1/feedback", json={"samples": digit_samples(prefix="boot", start=k, stop=k + 100)}
                ).status_code
                == 200
            )
        wait_for(lambda: http.get("/v1/status").json()["serving_version"], 180, "the bootstrap champion served")
        x = digit_samples(prefix="probe", stop=4)

        # -- down ---------------------------------------------------------------------
        if locker is not None:
            locker.execute("BEGIN EXCLUSIVE")
        else:
            pg_admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            pg_admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d", d=dbname)
        down = digit_samples(prefix="down", stop=20)
        for _ in range(3):
            r = http.post("/v1/feedback", json={"samples": down})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable" and int(r.headers["Retry-After"]) > 0, r.text
            p = http.post("/v1/predict", json={"inputs": [{"x": s["x"]} for s in x]})
            assert p.status_code == 200 and len(p.json()["predictions"]) == 4, p.text
        assert http.get("/healthz").status_code == 200
        metrics = http.get("/metrics").text
        assert 'continual_feedback_rejected_total{reason="unavailable"} 60.0' in metrics

        # -- back, without a restart ---------------------------------------------------------
        if locker is not None:
            assert stored_id_counts(url, "down-") == {}  # WAL: readers still read while the writer lock is held
            locker.execute("ROLLBACK")
        else:
            pg_admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            assert stored_id_counts(url, "down-") == {}
        r = wait_for(
            lambda: (r := http.post("/v1/feedback", json={"samples": down})).status_code == 200 and r,
            30,
            "feedback accepted again",
        )
        assert r.json() == {"accepted": 20, "duplicates": 0}
        assert set(stored_id_counts(url, "down-")) == {s["id"] for s in down}
        assert http.post("/v1/predict", json={"inputs": [{"x": x[0]["x"]}]}).status_code == 200
        assert server.proc is not None and server.proc.poll() is None
    finally:
        http.close()
        if locker is not None:
            locker.close()
        server.stop()
        if backend == "postgresql":
            pg_admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
