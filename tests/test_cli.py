from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from continual import __version__
from continual.cli import main
from continual.config import load_settings
from continual.learn.run import create_run
from continual.store import NewSample, Store


def config(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "config.toml"
    p.write_text(
        f"""
[service]
data_dir = "{tmp_path / "data"}"
[model]
architecture = "mlp"
weights = "none"
classes = ["a", "b"]
[model.input]
kind = "vector"
shape = [4]
{extra}
"""
    )
    return p


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "continual.cli", *args], capture_output=True, text=True, timeout=120)


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"continual {__version__}"


def test_check_config_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(config(tmp_path))]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate]\nmin_accuracy = 2\n")
    proc = run_cli("check-config", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.startswith("continual: error:") and "[gate] min_accuracy = 2" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_db_upgrade_then_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(config(tmp_path))
    # Before the upgrade, status refuses with the command to run.
    proc = run_cli("status", "--config", cfg)
    assert proc.returncode == 1 and "continual db upgrade" in proc.stderr and "Traceback" not in proc.stderr
    assert main(["db", "upgrade", "--config", cfg]) == 0
    assert main(["db", "current", "--config", cfg]) == 0
    store = Store(f"sqlite:///{tmp_path / 'data' / 'continual.db'}")
    store.insert(
        [NewSample(f"id{i}", "ab"[i % 2], "vector", np.zeros(4, np.float32).tobytes() + bytes([i])) for i in range(20)]
    )
    capsys.readouterr()
    assert main(["status", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "samples: 20 stored" in out and "champion: none yet" in out
    assert main(["status", "--json", "--config", cfg]) == 0
    assert '"total": 20' in capsys.readouterr().out
    assert "training backoff" not in out

    # Two failed runs in a row: status says how long the next automatic run waits.
    settings = load_settings(Path(cfg), env={})
    for _ in range(2):
        run_id = create_run(store, settings, trigger="test")
        store.runs.start(run_id, parent=None, data_cutoff=20)
        store.runs.finish(run_id, "failed", error="boom")
    assert main(["status", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "training backoff: 2 failed runs in a row; the next automatic run waits 600 s" in out, out
    assert "error=boom" in out
    store.dispose()


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTINUAL_CONFIG", str(config(tmp_path)))
    assert main(["db", "upgrade"]) == 0
    assert (tmp_path / "data" / "continual.db").exists()


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("status", "--config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
