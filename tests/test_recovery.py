"""Restart recovery's fallback: a champion whose files fail verification gives way to the newest intact earlier one."""

from __future__ import annotations

from pathlib import Path

import torch
from looputil import make_loop

from continual.models import build_model
from continual.service import recovery
from continual.service.context import ServiceContext


def _versions(tmp_path: Path) -> tuple[ServiceContext, list[str], str]:
    """Champions a -> b -> c (c now), and d: newer than all of them but never champion."""
    ctx = make_loop(tmp_path)
    s, reg = ctx.settings, ctx.registry
    spec = s.model.input.model_dump(mode="json")
    champions = []
    for seed in range(3):
        torch.manual_seed(seed)
        champions.append(reg.import_model(build_model(s.model), input_spec=spec).version)
    torch.manual_seed(9)
    model = build_model(s.model)
    never = reg.write_version(
        model.state_dict(), architecture=model.architecture, classes=model.classes, input_spec=spec,
        parent=None, data_cutoff=0,
    ).version  # fmt: skip
    assert ctx.store.versions.champion_version() == champions[-1]
    return ctx, champions, never


def _corrupt(ctx: ServiceContext, version: str) -> None:
    (ctx.registry.root / version / "weights.safetensors").write_bytes(b"not the weights")


def test_a_corrupt_champion_falls_back_to_the_newest_intact_earlier_one(tmp_path: Path) -> None:
    ctx, (_a, b, c), _never = _versions(tmp_path)
    _corrupt(ctx, c)
    out = recovery.recover(ctx)
    assert out.fallback == b  # the newest earlier champion, not a, and never the newer non-champion
    champion = ctx.store.versions.champion()
    assert champion is not None and (champion.version, champion.previous, champion.reason) == (b, c, "recovery")
    assert champion.details["broken"] == c and "weights.safetensors" in champion.details["error"]
    (event,) = ctx.store.records.events(kind="champion_fallback")
    assert event["data"] == {"broken": c, "fallback": b, "error": champion.details["error"]}
    assert ctx.serving is not None and ctx.serving.version() == b
    assert ctx.metrics.registry.get_sample_value("continual_model_load_failures_total") >= 1


def test_the_fallback_skips_earlier_champions_that_are_corrupt_too(tmp_path: Path) -> None:
    ctx, (a, b, c), _never = _versions(tmp_path)
    _corrupt(ctx, c)
    (ctx.registry.root / b / "manifest.json").unlink()
    assert recovery.recover(ctx).fallback == a
    assert ctx.store.versions.champion_version() == a
    assert ctx.store.versions.history()[0]["reason"] == "recovery"


def test_with_no_intact_earlier_champion_nothing_moves(tmp_path: Path) -> None:
    ctx, champions, _never = _versions(tmp_path)
    for v in champions:
        _corrupt(ctx, v)
    size = ctx.store.versions.history_size()
    out = recovery.recover(ctx)
    assert out.fallback is None
    assert ctx.store.versions.champion_version() == champions[-1]
    assert ctx.store.versions.history_size() == size
    (event,) = ctx.store.records.events(kind="champion_fallback")
    assert event["data"] == {"broken": champions[-1]} and "no intact earlier champion" in event["message"]
    assert ctx.serving is not None and ctx.serving.version() is None  # a corrupt model is never served


def test_an_intact_champion_stays(tmp_path: Path) -> None:
    ctx, (_a, _b, c), _never = _versions(tmp_path)
    out = recovery.recover(ctx)
    assert out.fallback is None and not out
    assert ctx.store.versions.champion_version() == c
    assert ctx.store.records.events(kind="champion_fallback") == []
