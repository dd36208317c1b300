"""The worker as a real child process: exit statuses, SIGTERM, SIGKILL, torchrun, ``continual train --now``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from learnutil import fill, settings_dict
from testkit import digit_arrays, write_toml

from continual.config import load_settings
from continual.learn.evaluate import evaluate
from continual.learn.launch import describe_exit, launch_run, wait_for_progress, worker_command
from continual.learn.run import create_run
from continual.registry import Registry
from continual.store import Store


def _setup(tmp_path: Path, n: int = 600, **training: object) -> tuple[Path, Store]:
    data_dir = tmp_path / "data"
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = write_toml(tmp_path / "config.toml", settings_dict(data_dir, url, **training))
    store = Store(url)
    store.upgrade()
    x, y = digit_arrays()
    fill(store, x[:n], y[:n], "s")
    return cfg, store


def _versions(data_dir: Path) -> list[str]:
    root = data_dir / "models"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_worker_command_local_and_torchrun(tmp_path: Path) -> None:
    cfg, _ = _setup(tmp_path, n=0)
    settings = load_settings(cfg)
    assert worker_command(settings, 7, cfg)[1:] == [
        "-m",
        "continual.service.worker",
        "--run",
        "7",
        "--config",
        str(cfg),
    ]
    tr = settings.model_copy(
        update={"training": settings.training.model_copy(update={"launcher": "torchrun", "nproc_per_node": 4})}
    )
    cmd = worker_command(tr, 7, None)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone"]
    multi = tr.model_copy(
        update={"training": tr.training.model_copy(update={"nnodes": 2, "rdzv_endpoint": "host-a:29400"})}
    )
    cmd = worker_command(multi, 7, None)
    assert "--rdzv_endpoint=host-a:29400" in cmd and "--nnodes=2" in cmd and "--rdzv_id=continual-run-7" in cmd
    assert describe_exit(-9) == "the worker was killed by SIGKILL"


def test_worker_process_succeeds_then_sigterm_cancels_the_next(tmp_path: Path) -> None:
    cfg, store = _setup(tmp_path, epochs=2)
    settings = load_settings(cfg)
    run_id = create_run(store, settings, trigger="test")
    handle = launch_run(settings, store, run_id, cfg)
    assert handle.wait(300) == 0, handle.log_path.read_text()
    row = store.runs.get(run_id)
    assert row["status"] == "succeeded" and row["candidate_version"] in _versions(settings.service.data_dir)

    endless = {"epochs": 5000, "early_stopping_patience": 100_000}
    long = settings.model_copy(update={"training": settings.training.model_copy(update=endless)})
    run_id = create_run(store, long, trigger="test")
    handle = launch_run(long, store, run_id, cfg)
    assert wait_for_progress(store, run_id, phase="training", timeout=300)["status"] == "running"
    # 143: the worker stopped on its own after SIGTERM (a SIGKILL after the grace period would read -9).
    assert handle.cancel(grace=60) == 143, handle.log_path.read_text()
    row = store.runs.get(run_id)
    assert row["status"] == "cancelled" and row["candidate_version"] is None
    assert len(_versions(settings.service.data_dir)) == 1


@pytest.mark.slow
def test_sigkill_mid_epoch_fails_the_run_and_the_service_keeps_serving(tmp_path: Path) -> None:
    from serverutil import ServerProcess

    data_dir = tmp_path / "data"
    url = f"sqlite:///{tmp_path / 'store.db'}"
    conf = settings_dict(data_dir, url, epochs=5000, early_stopping_patience=100_000)
    conf["model"]["classes"] = [str(i) for i in range(10)]
    server = ServerProcess(conf, workdir=tmp_path / "srv")
    server.start()
    try:
        store = Store(url)
        x, y = digit_arrays()
        fill(store, x[:500], y[:500], "s")
        settings = load_settings(server.config_path)
        run_id = create_run(store, settings, trigger="test")
        handle = launch_run(settings, store, run_id, server.config_path)
        row = wait_for_progress(store, run_id, phase="training", timeout=300)
        assert row["status"] == "running" and row["progress"]["step"] >= 1
        os.kill(handle.pid, signal.SIGKILL)
        assert handle.wait(60) == -signal.SIGKILL
        row = store.runs.get(run_id)
        assert row["status"] == "failed" and "SIGKILL" in row["error"]
        assert _versions(data_dir) == []

        # The parent dies too (no one calls wait): restart recovery marks the run interrupted.
        run_id = create_run(store, settings, trigger="test")
        handle = launch_run(settings, store, run_id, server.config_path)
        wait_for_progress(store, run_id, phase="training", timeout=300)
        os.kill(handle.pid, signal.SIGKILL)
        handle.process.wait(60)
        # Two things race for the orphaned run: restart recovery (called here) and the running
        # service's own tick, which interrupts a "running" run whose local worker pid is gone.
        # Either way it must end interrupted, exactly once, and say why.
        interrupted = store.runs.interrupt_all()
        row = store.runs.get(run_id)
        assert row["status"] == "interrupted", row
        if interrupted != [run_id]:
            assert interrupted == [] and row["error"] == "its trainer or worker is gone", (interrupted, row)
        assert _versions(data_dir) == []

        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        sample = {"id": "after-kill", "label": "3", "x": [0.0] * 64}
        r = httpx.post(server.url + "/v1/feedback", json={"samples": [sample]}, timeout=10)
        assert r.status_code == 200 and r.json()["accepted"] == 1
        status = httpx.get(server.url + "/v1/status", timeout=10).json()
        assert [r["status"] for r in status["last_runs"][:2]] == ["interrupted", "failed"]
    finally:
        server.stop()


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_a_single_process(tmp_path: Path) -> None:
    results = {}
    for launcher, nproc in (("local", 1), ("torchrun", 2)):
        work = tmp_path / launcher
        work.mkdir()
        cfg, store = _setup(
            work, n=1200, epochs=6, launcher=launcher, nproc_per_node=nproc, batch_size=16 if nproc == 2 else 32
        )
        settings = load_settings(cfg)
        run_id = create_run(store, settings, trigger="test")
        handle = launch_run(settings, store, run_id, cfg)
        assert handle.wait(500) == 0, handle.log_path.read_text()[-3000:]
        row = store.runs.get(run_id)
        assert row["status"] == "succeeded", row["error"]
        registry = Registry(settings.models_dir, store)
        manifest = registry.manifest(row["candidate_version"])
        assert manifest.extra["world_size"] == nproc
        assert "fisher.safetensors" in manifest.files
        model = registry.load_model(row["candidate_version"], settings)
        results[launcher] = evaluate(model, store, store.draw(10_000, split="holdout"), settings).accuracy
    # Same global batch (2 x 16 = 32), same data: the same accuracy within noise.
    assert results["local"] > 0.85 and results["torchrun"] > 0.85
    assert abs(results["local"] - results["torchrun"]) <= 0.05, results


@pytest.mark.slow
def test_cli_train_now_prints_the_candidate(tmp_path: Path) -> None:
    cfg, store = _setup(tmp_path, epochs=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "continual.cli", "train", "--now", "--config", str(cfg), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "training run 1: succeeded" in proc.stdout
    assert "validation_accuracy:" in proc.stdout and "candidate: " in proc.stdout
    assert store.runs.get(1)["candidate_version"] in proc.stdout

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "continual.cli", "train", "--config", str(cfg), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    # Without --now: a pending run for the service's trainer (none runs here), like POST /v1/train.
    requested = cli()
    assert requested.returncode == 0 and requested.stdout.strip() == "2", requested.stderr
    assert "requested" in requested.stderr and "gates it" in requested.stderr
    row = store.runs.get(2)
    assert row["status"] == "pending" and row["trigger"] == "manual: cli"
    for args, message in (
        ((), "training run 2 is pending already"),
        (("--now",), "training run 2 is pending already"),
        (("--strategy", "naive"), "--strategy and --seed apply to --now only"),
        (("--now", "--wait"), "--wait and --timeout apply to a requested run"),
        (("--timeout", "5"), "--timeout needs --wait"),
        (("--wait", "--timeout", "0"), "--timeout needs --wait and a positive number"),
    ):
        refused = cli(*args)
        assert refused.returncode == 1 and message in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert [r["id"] for r in store.runs.recent()] == [2, 1]
    # The operator changes their mind before any trainer took it.
    cancelled = cli("--cancel")
    assert cancelled.returncode == 0 and "training run 2: cancelled (it had not started)" in cancelled.stdout
    assert store.runs.get(2)["status"] == "cancelled"
    nothing = cli("--cancel")
    assert nothing.returncode == 1 and "no training run is pending or running" in nothing.stderr
    assert cli("--cancel", "--now").returncode == 1
