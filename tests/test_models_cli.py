"""``continual models list|promote|rollback|import|prune`` through the real entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from serverutil import BASE_CONFIG
from testkit import to_toml

from continual.cli import main
from continual.config import settings_from_dict
from continual.models import build_model


@pytest.fixture
def config(tmp_path: Path, store_url: str) -> Path:
    path = tmp_path / "config.toml"
    cfg = {**BASE_CONFIG, "service": {"data_dir": str(tmp_path / "data")}, "store": {"url": store_url}}
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert main(["db", "upgrade", "--config", str(path)]) == 0
    return path


def weights(tmp_path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    path = tmp_path / f"w{seed}.pt"
    torch.save(build_model(settings_from_dict(BASE_CONFIG).model).state_dict(), path)
    return path


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["models", *args, "--config", str(config)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_list_promote_rollback_prune(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, config, "list")
    assert code == 0 and "no model versions yet" in out
    code, out, _ = run(capsys, config, "import", str(weights(tmp_path, 1)))
    assert code == 0 and "champion:" in out
    a = out.split()[1]
    code, out, _ = run(capsys, config, "import", str(weights(tmp_path, 2)), "--no-promote", "--data-cutoff", "5")
    b = out.split()[1]
    code, out, _ = run(capsys, config, "list")
    assert f"* {a}" in out and f"  {b}" in out and "import by cli:" in out
    assert f"-> {b}" in run(capsys, config, "promote", b)[1]
    assert f"{b} -> {a}" in run(capsys, config, "rollback")[1]
    code, out, _ = run(capsys, config, "list", "--json")
    assert code == 0 and '"reason": "rollback"' in out
    # Both were champion once: retention keeps them.
    assert "deleted 0 version(s)" in run(capsys, config, "prune", "--keep", "1")[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["promote", "nope"], "not a version id"),
        (["rollback"], "no champion to roll back"),
        (["import", "/nonexistent.safetensors"], "does not exist"),
    ],
)
def test_mistakes_are_one_line_errors(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run(capsys, config, *args)
    assert code == 1 and message in err and "Traceback" not in err


def test_import_refuses_weights_for_other_classes(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.safetensors"
    save_file({"head.weight": torch.zeros(3, 16), "head.bias": torch.zeros(3)}, wrong)
    code, _, err = run(capsys, config, "import", str(wrong))
    assert code == 1 and "head has 3 classes, [model] classes has 10" in err
    assert "no model versions yet" in run(capsys, config, "list")[1]
