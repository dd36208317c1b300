"""The service's jobs over a fresh store, with a tiny-model config that trains on the digits stream in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serverutil import BASE_CONFIG
from testkit import merge, write_toml

from continual.config import load_settings
from continual.metrics import Metrics
from continual.registry import Registry
from continual.service.context import ServiceContext, State
from continual.serving import Serving
from continual.store import Store

# Tuned for the 64-d digits stream: an MLP trained from scratch needs more than the
# 1e-4 fine-tuning default of a pretrained backbone.
LOOP_CONFIG: dict[str, Any] = merge(
    BASE_CONFIG,
    {
        "model": {"mode": "all", "hidden": [64]},
        "triggers": {
            "check_interval_seconds": 1,
            "min_new_samples": 200,
            "max_new_samples": 100_000,
            "max_interval_seconds": 86_400,
            "cooldown_seconds": 0,
        },
        "drift": {"min_samples": 50, "window": 500, "permutations": 200},
        "training": {"epochs": 8, "learning_rate": 0.003, "head_learning_rate": 0.003, "batch_size": 32},
        "gate": {"min_holdout_samples": 20, "max_old_forgetting": 0.05, "significance": 0.05, "min_accuracy": 0.6},
    },
)


def write_config(workdir: Path, over: dict[str, Any] | None = None) -> Path:
    cfg = merge(LOOP_CONFIG, {"service": {"data_dir": str(workdir / "data")}, **(over or {})})
    return write_toml(workdir / "config.toml", cfg)


def make_loop(workdir: Path, over: dict[str, Any] | None = None) -> ServiceContext:
    """The service's context over a fresh store in ``workdir``, its jobs to be called directly (no scheduler)."""
    path = write_config(workdir, over)
    settings = load_settings(path, env={})
    store = Store.from_settings(settings)
    store.upgrade()
    metrics = Metrics()
    return ServiceContext(
        settings=settings,
        store=store,
        registry=Registry(settings.models_dir, store, on_refused=metrics.model_refused),
        metrics=metrics,
        state=State(metrics),
        serving=Serving(settings, events=metrics),
        config_path=str(path),
    )
