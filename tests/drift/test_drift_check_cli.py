"""``continual drift check`` through the real entry point, against a real store and registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from looputil import write_config
from modelutil import feed, import_champion
from testkit import digit_samples

from continual.cli import main
from continual.config import load_settings
from continual.registry import Registry
from continual.store import Store


@pytest.fixture
def config(tmp_path: Path, store_url: str) -> Path:
    path = write_config(tmp_path, {"store": {"url": store_url}})
    assert main(["db", "upgrade", "--config", str(path)]) == 0
    return path


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["drift", "check", *args, "--config", str(config)])
    out = capsys.readouterr()
    return code, out.out, out.err


def n_rows(store: Store) -> int:
    return len(store.records.drift_checks())


def test_drift_check_reports_each_detector(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, config)
    assert code == 1 and "no champion yet" in err

    settings = load_settings(config, env={})
    store = Store.from_settings(settings)
    feed(store, digit_samples("original", stop=400))
    registry = Registry(settings.models_dir, store)
    version = import_champion(registry, settings, store.max_seq())

    code, out, _ = run(capsys, config)
    assert code == 0 and "no drift" in out and "too few samples" in out and "not recorded" in out
    assert n_rows(store) == 0

    feed(store, digit_samples("inverted", start=400, stop=600))
    code, out, _ = run(capsys, config)
    assert code == 0 and f"champion {version}: DRIFT DETECTED" in out, out
    assert "mmd" in out and "ks" in out and "label_shift" in out and "p-value" in out
    assert "prediction_shift   skipped: no serving process" in out
    assert "check #1" in out and n_rows(store) == 1

    code, out, _ = run(capsys, config, "--json", "--no-record")
    d = json.loads(out)
    assert code == 0 and d["detected"] is True and d["check_id"] is None and n_rows(store) == 1
    mmd = next(r for r in d["detectors"] if r["detector"] == "mmd")
    assert mmd["detected"] is True and 0 < mmd["p_value"] < 0.01 and mmd["n_current"] == 200
    store.dispose()
