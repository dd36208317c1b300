"""``/healthz`` and ``/readyz`` answer while every request thread of a real ``continual serve`` is blocked."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from serverutil import ServerProcess, request_threads_blocked
from testkit import wait_for

pytestmark = pytest.mark.slow

# Feedback commits wait up to a minute for the SQLite write lock the test holds.
CONFIG = {"store": {"busy_timeout_ms": 60_000}}


def test_probes_answer_while_every_request_thread_is_blocked(tmp_path: Path) -> None:
    server = ServerProcess(CONFIG, workdir=tmp_path)
    server.start()
    try:
        with request_threads_blocked(server) as codes:
            start = time.monotonic()
            health = httpx.get(server.url + "/healthz", timeout=10)
            health_s = time.monotonic() - start
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            assert health_s < 5.0, f"/healthz took {health_s:.1f}s"
            # The store ping runs in its own thread with a deadline: ready or not, it answers.
            start = time.monotonic()
            ready = httpx.get(server.url + "/readyz", timeout=15)
            ready_s = time.monotonic() - start
            assert ready.status_code in (200, 503) and set(ready.json()) == {"ready", "store", "model"}, ready.text
            # readyz_timeout_seconds (2 s) for the store ping, plus a loaded machine's slack.
            assert ready_s < 8.0, f"/readyz took {ready_s:.1f}s"
            assert codes == [], "the blocked requests must still be waiting"
        assert codes and set(codes) == {200}, codes
        # A ping that waited out the block may still answer "store": false once; then the store is back.
        # (Not ready as a whole: this server has no champion, so "model" stays false.)
        wait_for(lambda: httpx.get(server.url + "/readyz", timeout=10).json()["store"], 60, "the store reachable again")
    finally:
        server.stop()
