"""`continual train --wait` / `--cancel` against a real service: its trainer runs (or stops) the requested run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from looputil import LOOP_CONFIG
from serverutil import ServerProcess
from testkit import digit_samples, merge, wait_for

from continual.client import Client
from continual.procutil import process_alive
from continual.store import Store
from continual.store.runs import ACTIVE

pytestmark = pytest.mark.slow

# Nothing starts a run by itself: 300 samples stay below min_new_samples.
CONFIG = merge(LOOP_CONFIG, {"triggers": {"min_new_samples": 10_000, "max_new_samples": 10_000}})


def test_train_wait_follows_a_requested_run_to_the_gate(tmp_path: Path) -> None:
    server = ServerProcess(CONFIG, workdir=tmp_path)
    url = server.start()
    store = Store(f"sqlite:///{tmp_path / 'data' / 'continual.db'}")
    try:
        with Client(url, timeout=60) as client:
            client.feedback(digit_samples("original", stop=300), batch_size=100)
            assert client.status()["active_run"] is None
        proc = subprocess.run(
            [sys.executable, "-m", "continual.cli", "train", "--wait", "--quiet", "--timeout", "300"],
            capture_output=True, text=True, env=server.env, cwd=server.workdir, timeout=400,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = store.runs.recent(limit=1)[0]
        assert run["trigger"] == "manual: cli" and run["status"] == "succeeded", run
        decision = store.records.decision_for_run(run["id"])
        assert decision is not None and decision["candidate"] == run["candidate_version"]
        assert f"training run {run['id']}: succeeded" in proc.stdout
        assert f"gate: {decision['outcome']} (rule {decision['rule']})" in proc.stdout, proc.stdout
        # No champion yet: the bootstrap rules decide (promoted, or rejected below min_accuracy).
        assert decision["rule"] in ("bootstrap", "min_accuracy"), decision
    finally:
        store.dispose()
        server.stop()


def test_train_cancel_stops_the_running_worker_and_the_service_goes_on(tmp_path: Path) -> None:
    endless = {"training": {"epochs": 5000, "early_stopping_patience": 100_000}}
    server = ServerProcess(merge(CONFIG, endless), workdir=tmp_path)
    url = server.start()
    store = Store(f"sqlite:///{tmp_path / 'data' / 'continual.db'}")
    try:
        with Client(url, timeout=60) as client:
            client.feedback(digit_samples("original", stop=300), batch_size=100)
            run_id = client.train()["run_id"]

        def training() -> dict[str, object] | None:
            row = store.runs.get(run_id)
            assert row["status"] in ACTIVE, row  # it must not end before it is cancelled
            return row if row["status"] == "running" and (row["progress"] or {}).get("step") else None

        row = wait_for(training, 180, f"run {run_id} training")
        pid = int(row["pid"])

        proc = server.cli("train", "--cancel", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"training run {run_id}: cancelled" in proc.stdout
        row = store.runs.get(run_id)
        assert row["status"] == "cancelled" and row["candidate_version"] is None, row
        # The row says cancelled just before the worker exits.
        wait_for(lambda: not process_alive(pid), 30, f"worker {pid} exiting after its run was cancelled", 0.1)

        # The service goes on: healthy, no failure counted, a new request is accepted.
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200

        def idle() -> str | None:
            text = httpx.get(url + "/metrics", timeout=10).text
            return text if 'continual_state{state="idle"} 1.0' in text else None

        text = wait_for(idle, 30, "the service returning to idle")
        assert "continual_training_failures_total 0.0" in text
        assert httpx.post(url + "/v1/train", timeout=30).status_code == 202
    finally:
        store.dispose()
        server.stop()
