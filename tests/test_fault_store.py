"""The store goes away under a running service: feedback 503 (nothing stored), predictions go on, it comes back.

SQLite: tests run as root, so a read-only file would not stop writes; another
connection holding the write lock (``BEGIN EXCLUSIVE``) does, past the service's
busy timeout. PostgreSQL: the service's dedicated database stops accepting
connections and its sessions are terminated, then it is let back in.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import httpx
import pytest
from loadutil import stored_id_counts
from looputil import LOOP_CONFIG
from pgutil import require_pg
from serverutil import ServerProcess
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from testkit import digit_samples, merge, wait_for

pytestmark = pytest.mark.slow

CONFIG = merge(LOOP_CONFIG, {"store": {"busy_timeout_ms": 300}})


def pg_database() -> tuple[str, str]:
    name = f"continual_fault_{uuid.uuid4().hex[:10]}"
    return name, make_url(require_pg()).set(database=name).render_as_string(hide_password=False)


def pg_admin(sql: str, **params: str) -> None:
    engine = create_engine(require_pg(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_store_down_feedback_503_predict_200_then_recovers(tmp_path: Path, backend: str) -> None:
    env = {}
    if backend == "postgresql":
        require_pg()
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


@pytest.mark.postgres
def test_a_database_that_stops_answering_gets_503s_not_hung_threads_then_nothing_is_lost(tmp_path: Path) -> None:
    """A session holds a lock on the samples table: writes wait on it. Every request must still be answered.

    Before statement and pool timeouts existed, these requests hung until the lock was released.
    """
    import threading

    require_pg()
    dbname, url = pg_database()
    pg_admin(f'CREATE DATABASE "{dbname}"')
    config = merge(
        CONFIG,
        {"store": {"pool_size": 1, "pool_timeout_seconds": 1, "statement_timeout_seconds": 2}},
    )
    server = ServerProcess(config, workdir=tmp_path, env={"CONTINUAL_STORE__URL": url})
    http = httpx.Client(base_url=server.url, timeout=30)  # far above both timeouts: a hang fails the test
    locker = create_engine(url).connect()
    try:
        server.start()
        assert http.post("/v1/feedback", json={"samples": digit_samples(prefix="before", stop=10)}).status_code == 200

        tx = locker.begin()
        locker.execute(text("LOCK TABLE samples IN ACCESS EXCLUSIVE MODE"))
        answers: list[httpx.Response | Exception] = []

        def send(k: int) -> None:
            try:
                answers.append(http.post("/v1/feedback", json={"samples": digit_samples(prefix=f"held{k}", stop=5)}))
            except Exception as e:  # a timeout here is the failure under test
                answers.append(e)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(isinstance(a, httpx.Response) for a in answers), answers
        assert [a.status_code for a in answers] == [503] * 4, [a.text for a in answers]  # type: ignore[union-attr]
        for a in answers:
            body = a.json()["error"]  # type: ignore[union-attr]
            assert body["code"] == "store_unavailable" and int(a.headers["Retry-After"]) > 0  # type: ignore[union-attr]
            # The database's error names hosts, ports and databases: the log gets it, the client does not.
            assert "5432" not in body["message"] and dbname not in body["message"], body
        assert http.get("/healthz").status_code == 200
        tx.rollback()

        for k in range(4):  # the clients resend (the Python client does so by itself on 503)
            r = wait_for(
                lambda k=k: (
                    (
                        r := http.post("/v1/feedback", json={"samples": digit_samples(prefix=f"held{k}", stop=5)})
                    ).status_code
                    == 200
                    and r
                ),
                30,
                "feedback accepted again",
            )
            assert r.json() == {"accepted": 5, "duplicates": 0}
        counts = stored_id_counts(url)
        assert len(counts) == 30 and set(counts.values()) == {1}
    finally:
        locker.close()
        http.close()
        server.stop()
