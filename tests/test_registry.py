from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from continual.config import InputSettings, ModelSettings, Settings
from continual.metrics import Metrics
from continual.models import build_model
from continual.registry import (
    CRASH_ENV,
    CRASH_STEPS,
    MANIFEST,
    TMP_PREFIX,
    ChecksumMismatch,
    NoPreviousChampion,
    Registry,
    VersionNotFound,
    new_version_id,
)

SETTINGS = Settings(
    model=ModelSettings(
        architecture="mlp",
        weights="none",
        classes=("a", "b"),
        hidden=(4,),
        input=InputSettings(kind="vector", shape=(3,)),
    )
)


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(SETTINGS.model).state_dict()


def write(reg: Registry, seed: int = 0, **kw: object) -> str:
    args: dict[str, object] = {
        "architecture": "mlp",
        "classes": ("a", "b"),
        "input_spec": SETTINGS.model.input.model_dump(mode="json"),
        "parent": None,
        "data_cutoff": 7,
    }
    args.update(kw)
    return reg.write_version(state(seed), **args).version  # type: ignore[arg-type]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def reg(store, tmp_path: Path, metrics: Metrics) -> Registry:  # type: ignore[no-untyped-def]
    return Registry(tmp_path / "models", store, on_refused=metrics.model_refused)


def test_write_and_load_round_trip(reg: Registry) -> None:
    fisher = {"backbone.1.0.weight": torch.rand(4, 3)}
    m = reg.write_version(
        state(1),
        architecture="mlp",
        classes=("a", "b"),
        input_spec=SETTINGS.model.input.model_dump(mode="json"),
        parent=None,
        data_cutoff=42,
        run_id=3,
        metrics={"old": 0.9},
        extra_tensors={"fisher": fisher},
        extra={"seed": 1},
    )
    d = reg.root / m.version
    assert sorted(p.name for p in d.iterdir()) == ["fisher.safetensors", MANIFEST, "weights.safetensors"]
    assert not list(reg.root.glob(TMP_PREFIX + "*"))
    on_disk = json.loads((d / MANIFEST).read_text())
    assert set(on_disk["files"]) == {"weights.safetensors", "fisher.safetensors"}
    assert on_disk["data_cutoff"] == 42 and on_disk["input"]["shape"] == [3] and on_disk["run_id"] == 3
    assert reg.manifest(m.version) == m
    loaded = reg.load_state(m.version)
    assert all(torch.equal(loaded[k], v) for k, v in state(1).items())
    assert torch.equal(reg.load_tensors(m.version, "fisher")["backbone.1.0.weight"], fisher["backbone.1.0.weight"])  # type: ignore[index]
    assert reg.load_tensors(m.version, "nothing") is None
    model = reg.load_model(m.version, Settings())  # the manifest decides the architecture, not the config
    assert not model.training and model.classes == ("a", "b") and model(torch.zeros(1, 3)).shape == (1, 2)
    (row,) = reg.store.versions.rows()
    assert row["version"] == m.version and row["status"] == "candidate" and row["data_cutoff"] == 42
    assert reg.store.versions.champion_version() is None


def test_version_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_version_id() for _ in range(500)]
    assert len(set(ids)) == 500 and ids == sorted(ids)


def test_a_flipped_byte_is_refused_counted_and_recorded(reg: Registry, metrics: Metrics) -> None:
    v = write(reg)
    path = reg.root / v / "weights.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    for load in (
        reg.load_state,
        lambda x: reg.load_model(x, SETTINGS),
        lambda x: reg.promote(x, expected=None, reason="manual"),
    ):
        with pytest.raises(ChecksumMismatch) as e:
            load(v)
        assert e.value.version == v and e.value.file == "weights.safetensors"
    assert metrics.registry.get_sample_value("continual_model_load_failures_total") == 3
    assert any(ev["kind"] == "model_load_refused" and v in ev["message"] for ev in reg.store.records.events())
    assert reg.store.versions.champion_version() is None  # the refused promote moved nothing


def test_a_rewritten_manifest_is_caught_by_the_store_record(reg: Registry) -> None:
    v = write(reg)
    d = reg.root / v
    torch.manual_seed(5)
    from safetensors.torch import save_file

    save_file(state(5), d / "weights.safetensors")
    # Someone "fixes" the manifest to match the swapped weights.
    import hashlib

    m = json.loads((d / MANIFEST).read_text())
    data = (d / "weights.safetensors").read_bytes()
    m["files"]["weights.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ChecksumMismatch, match=r"manifest\.json"):
        reg.load_state(v)


def test_unknown_or_malformed_versions(reg: Registry) -> None:
    for bad in ("../../etc", "nope", "20261123T133543.532206-1a40cb"):
        with pytest.raises(VersionNotFound):
            reg.load_state(bad)
        with pytest.raises(VersionNotFound):
            reg.promote(bad, expected=reg.store.versions.champion_version(), reason="manual")


def _crashing_writer(root: str, url: str, step: str) -> None:
    """Runs in a forked child: its own store connection, SIGKILLed by the registry at ``step``."""
    from continual.store import Store

    os.environ[CRASH_ENV] = step
    reg = Registry(Path(root), Store(url))
    reg.write_version(
        {"w": torch.randn(64, 64)},
        architecture="mlp",
        classes=("a", "b"),
        input_spec={"kind": "vector", "shape": [3]},
        parent=None,
        data_cutoff=0,
        extra_tensors={"fisher": {"w": torch.ones(64, 64)}},
    )
    os._exit(0)  # not killed: the test fails on the exit code


@pytest.mark.slow
@pytest.mark.parametrize("step", CRASH_STEPS)
def test_a_writer_killed_at_any_step_never_leaves_a_loadable_half_version(reg: Registry, step: str) -> None:
    # A forked child (real process, real SIGKILL) starts in milliseconds; a fresh interpreter takes seconds.
    child = multiprocessing.get_context("fork").Process(
        target=_crashing_writer, args=(str(reg.root), reg.store.url, step)
    )
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL, f"writer exited with {child.exitcode}, not killed at {step!r}"
    published = [p.name for p in reg.root.iterdir() if not p.name.startswith(TMP_PREFIX)]
    complete = step in ("rename", "insert")
    if complete:
        # Past the rename the version is whole: every file verifies.
        assert len(published) == 1
        reg.verify(published[0])
    else:
        assert published == []
        assert len(list(reg.root.glob(TMP_PREFIX + "*"))) == 1
    removed = reg.discard_unfinished()
    assert len(removed) == (0 if complete else 1)
    assert not list(reg.root.glob(TMP_PREFIX + "*"))
    # After start-up recovery, the store and the directory agree.
    assert [v["version"] for v in reg.store.versions.rows()] == published
    for v in published:
        assert reg.load_state(v)["w"].shape == (64, 64)


def test_discard_keeps_the_directory_of_a_live_writer(reg: Registry) -> None:
    import socket

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = reg.root / f"{TMP_PREFIX}{new_version_id()}-{sleeper.pid}@{socket.gethostname()}"
        dead = reg.root / f"{TMP_PREFIX}{new_version_id()}-{2**22 + 17}@{socket.gethostname()}"
        foreign_fresh = reg.root / f"{TMP_PREFIX}{new_version_id()}-1@some-other-host"
        dashed_host = reg.root / f"{TMP_PREFIX}{new_version_id()}-{sleeper.pid}@{socket.gethostname()}-x"
        for d in (live, dead, foreign_fresh, dashed_host):
            d.mkdir()
            (d / "weights.safetensors").write_bytes(b"partial")
        assert reg.discard_unfinished() == [dead.name]
        assert live.exists() and foreign_fresh.exists() and dashed_host.exists() and not dead.exists()
        assert reg.discard_unfinished(stale_seconds=0) == sorted([foreign_fresh.name, dashed_host.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_promote_and_rollback_are_recorded(reg: Registry) -> None:
    a, b = write(reg, 1), write(reg, 2)
    with pytest.raises(NoPreviousChampion):
        reg.rollback()
    reg.promote(a, expected=reg.store.versions.champion_version(), reason="import", actor="cli:me")
    with pytest.raises(NoPreviousChampion, match="first champion"):
        reg.rollback()
    reg.promote(b, expected=reg.store.versions.champion_version(), reason="gate", details={"run": 1})
    assert not reg.promote(b, expected=b, reason="manual")  # already champion: nothing recorded
    assert reg.store.versions.champion_version() == b
    status = {v["version"]: v["status"] for v in reg.store.versions.rows()}
    assert status == {a: "retired", b: "champion"}

    assert reg.rollback(actor="token:abc") == (b, a)
    assert reg.store.versions.champion_version() == a
    newest = reg.store.versions.history()[0]
    assert (newest["version"], newest["previous"], newest["reason"], newest["actor"]) == (a, b, "rollback", "token:abc")
    assert [h["reason"] for h in reg.store.versions.history()] == ["rollback", "gate", "import"]
    assert {v["version"]: v["status"] for v in reg.store.versions.rows()} == {a: "champion", b: "retired"}


def test_rollback_refuses_a_corrupt_previous_champion(reg: Registry) -> None:
    a, b = write(reg, 1), write(reg, 2)
    reg.promote(a, expected=reg.store.versions.champion_version(), reason="import")
    reg.promote(b, expected=reg.store.versions.champion_version(), reason="gate")
    (reg.root / a / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ChecksumMismatch):
        reg.rollback()
    assert reg.store.versions.champion_version() == b


def test_retention_keeps_the_newest_and_every_champion(reg: Registry) -> None:
    vs = [write(reg, i) for i in range(6)]
    reg.promote(vs[0], expected=reg.store.versions.champion_version(), reason="import")
    reg.promote(vs[2], expected=reg.store.versions.champion_version(), reason="gate")
    reg.rollback()  # vs[0] champion again; vs[2] was champion once
    deleted = reg.apply_retention(keep_last=2)
    assert deleted == [vs[1], vs[3]]
    kept = {vs[0], vs[2], vs[4], vs[5]}
    assert {p.name for p in reg.root.iterdir()} == kept
    status = {v["version"]: v["status"] for v in reg.store.versions.rows()}
    assert status[vs[1]] == status[vs[3]] == "deleted"
    for v in kept:
        reg.load_state(v)
    assert reg.apply_retention(keep_last=2) == []  # idempotent
    with pytest.raises(ValueError, match="keep_last"):
        reg.apply_retention(0)
