"""`continual train --wait` against a real service: the request is trained and gated by the service's trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from looputil import LOOP_CONFIG, digits
from serverutil import ServerProcess, merge

from continual.client import Client
from continual.learn import runs
from continual.status import decision_for_run
from continual.store import Store

pytestmark = pytest.mark.slow

# Nothing starts a run by itself: 300 samples stay below min_new_samples.
CONFIG = merge(LOOP_CONFIG, {"triggers": {"min_new_samples": 10_000, "max_new_samples": 10_000}})


def test_train_wait_follows_a_requested_run_to_the_gate(tmp_path: Path) -> None:
    server = ServerProcess(CONFIG, workdir=tmp_path)
    url = server.start()
    store = Store(f"sqlite:///{tmp_path / 'data' / 'continual.db'}")
    try:
        with Client(url, timeout=60) as client:
            client.feedback(digits("original", stop=300), batch_size=100)
            assert client.status()["active_run"] is None
        proc = subprocess.run(
            [sys.executable, "-m", "continual.cli", "train", "--wait", "--quiet", "--timeout", "300"],
            capture_output=True, text=True, env=server.env, cwd=server.workdir, timeout=400,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = runs.list_runs(store, limit=1)[0]
        assert run["trigger"] == "manual: cli" and run["status"] == "succeeded", run
        decision = decision_for_run(store, run["id"])
        assert decision is not None and decision["candidate"] == run["candidate_version"]
        assert f"training run {run['id']}: succeeded" in proc.stdout
        assert f"gate: {decision['outcome']} (rule {decision['rule']})" in proc.stdout, proc.stdout
        # No champion yet: the bootstrap rules decide (promoted, or rejected below min_accuracy).
        assert decision["rule"] in ("bootstrap", "min_accuracy"), decision
    finally:
        store.dispose()
        server.stop()
