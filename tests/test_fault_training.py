"""A training worker that dies (SIGKILL) fails its run, never the service; the next run works."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import torch
from looputil import LOOP_CONFIG
from safetensors.torch import save_file
from serverutil import ServerProcess
from testkit import digit_samples, merge, wait_for

from continual.config import settings_from_dict
from continual.models import build_model
from continual.store import Store
from continual.store.runs import FINISHED

pytestmark = pytest.mark.slow

# Runs of a few seconds (no early stop), so the kill lands inside one.
CONFIG = merge(LOOP_CONFIG, {"training": {"epochs": 30, "early_stopping_patience": 1000}})


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(f"{name} not in /metrics")


def test_worker_killed_fails_the_run_service_serves_next_run_works(tmp_path: Path) -> None:
    server = ServerProcess(CONFIG, workdir=tmp_path)
    # A champion from imported weights: the service predicts before any run.
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(build_model(settings_from_dict(merge(CONFIG, {})).model).state_dict(), weights)
    server.cli("db", "upgrade")
    server.cli("models", "import", str(weights))
    server.start()
    http = httpx.Client(base_url=server.url, timeout=60)
    store = Store(f"sqlite:///{tmp_path / 'data' / 'continual.db'}")
    probe = {"inputs": [{"x": s["x"]} for s in digit_samples(prefix="probe", stop=4)]}
    try:
        assert http.get("/readyz").status_code == 200
        champion = http.post("/v1/predict", json=probe).json()["model_version"]
        for k in (0, 100, 200):
            assert (
                http.post(
                    "/v1/feedback", json={"samples": digit_samples(prefix="s", start=k, stop=k + 100)}
                ).status_code
                == 200
            )
        run_id = http.post("/v1/train").json()["run_id"]
        # The worker records its pid when it starts; kill it at once, mid-run.
        row = wait_for(lambda: (r := store.runs.get(run_id))["pid"] and r, 120, "the worker starting", 0.02)
        assert row["status"] == "running"
        os.kill(int(row["pid"]), signal.SIGKILL)
        row = wait_for(lambda: (r := store.runs.get(run_id))["status"] in FINISHED and r, 60, "run failing")
        assert row["status"] == "failed" and "SIGKILL" in row["error"] and row["candidate_version"] is None, row

        p = http.post("/v1/predict", json=probe)
        assert p.status_code == 200 and p.json()["model_version"] == champion, p.text
        assert http.get("/readyz").status_code == 200
        # The service counts the failure right after the run row says so.
        text = wait_for(
            lambda: (t := http.get("/metrics").text) and metric(t, "continual_training_failures_total") == 1.0 and t,
            30,
            "continual_training_failures_total == 1",
        )
        assert metric(text, "continual_training_runs_total") == 1.0
        assert server.proc is not None and server.proc.poll() is None
        backoff = http.get("/v1/status").json()["training_backoff"]
        assert backoff["consecutive_failures"] == 1 and backoff["retry_wait_seconds"] > 0, backoff

        # The next run works: it trains, and the gate decides on its candidate.
        run_id = wait_for(lambda: (r := http.post("/v1/train")).status_code == 202 and r, 60, "train accepted")
        run_id = run_id.json()["run_id"]
        row = wait_for(lambda: (r := store.runs.get(run_id))["status"] in FINISHED and r, 180, "next run")
        assert row["status"] == "succeeded" and row["candidate_version"], row
        decision = wait_for(lambda: http.get("/v1/status").json()["last_decision"], 60, "the gate decision")
        assert decision["run_id"] == run_id and decision["candidate"] == row["candidate_version"], decision
        assert http.get("/v1/status").json()["training_backoff"] is None
        assert http.post("/v1/predict", json=probe).status_code == 200
        assert metric(http.get("/metrics").text, "continual_training_failures_total") == 1.0
    finally:
        http.close()
        store.dispose()
        server.stop()
