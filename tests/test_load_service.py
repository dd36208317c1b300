"""Load: 8 feedback clients, 4 predict clients and a training run at once against one real ``continual serve``."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from loadutil import Load, percentile, stored_id_counts
from looputil import LOOP_CONFIG
from serverutil import ServerProcess
from testkit import digit_samples, wait_for

pytestmark = pytest.mark.slow

LOAD_SECONDS = 30.0


def bootstrap(url: str, n: int = 300) -> str:
    """Feed ``n`` >= min_new_samples samples and wait until the service serves its first champion."""
    with httpx.Client(base_url=url, timeout=30) as http:
        for k in range(0, n, 100):
            r = http.post("/v1/feedback", json={"samples": digit_samples(prefix="boot", start=k, stop=k + 100)})
            assert r.status_code == 200, r.text
        status = wait_for(
            lambda: (s := http.get("/v1/status").json())["champion"] and s["serving_version"] and s,
            180,
            "the bootstrap champion",
        )
    return str(status["champion"]["version"])


def test_feedback_predict_and_training_at_once(tmp_path: Path) -> None:
    server = ServerProcess(LOOP_CONFIG, workdir=tmp_path)
    server.start()
    try:
        bootstrap(server.url)
        admin = httpx.Client(base_url=server.url, timeout=30)
        runs_seen: set[int] = set()
        running_seen: set[int] = set()
        with Load(server.url, feeders=8, predictors=4, tag="load") as load:
            deadline = time.monotonic() + LOAD_SECONDS
            while time.monotonic() < deadline:
                status = admin.get("/v1/status")
                assert status.status_code == 200, status.text
                active = status.json()["active_run"]
                if active is None:
                    # Keep a run going for the whole window: ask again as soon as one ends.
                    r = admin.post("/v1/train")
                    assert r.status_code in (202, 409), r.text
                    if r.status_code == 202:
                        runs_seen.add(r.json()["run_id"])
                elif active["status"] == "running":
                    running_seen.add(active["id"])
                time.sleep(0.5)
        admin.close()
        assert load.acked, load.statuses
        assert not load.server_errors(), (load.server_errors(), load.bodies)
        assert not load.rejected and not load.unknown, (load.statuses, load.bodies)
        assert running_seen, f"no training run was running during the load (requested {sorted(runs_seen)})"
        assert load.latencies, load.statuses

        counts = stored_id_counts(f"sqlite:///{tmp_path / 'data' / 'continual.db'}", "load-")
        missing = load.acked - set(counts)
        assert not missing, f"{len(missing)} acknowledged samples are not stored, e.g. {sorted(missing)[:5]}"
        assert set(counts) == load.acked, "samples never acknowledged are stored"
        assert max(counts.values()) == 1

        p50, p99 = percentile(load.latencies, 50), percentile(load.latencies, 99)
        print(
            f"\nload: {LOAD_SECONDS:g} s, {len(load.acked)} samples acknowledged, {len(load.latencies)} predict requests,"
            f" predict latency p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms, runs running during load:"
            f" {sorted(running_seen)}, statuses {dict(load.statuses)}"
        )
    finally:
        server.stop()
