"""Digits as a drifting stream of 64-d vectors, and a tiny-model config that trains in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from serverutil import BASE_CONFIG, merge, to_toml
from sklearn.datasets import load_digits

from continual import daemon
from continual.config import load_settings
from continual.metrics import Metrics
from continual.registry import Registry
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
    path = workdir / "config.toml"
    path.write_text(to_toml(cfg))
    return path


def make_loop(workdir: Path, over: dict[str, Any] | None = None) -> daemon.Loop:
    """The service's loop over a fresh store in ``workdir``, its jobs to be called directly (no scheduler)."""
    path = write_config(workdir, over)
    settings = load_settings(path, env={})
    store = Store.from_settings(settings)
    store.upgrade()
    metrics = Metrics()
    return daemon.Loop(
        settings=settings,
        store=store,
        registry=Registry(settings.models_dir, store, metrics),
        metrics=metrics,
        serving=Serving(settings, metrics),
        config_path=str(path),
    )


def digits(phase: str, *, start: int = 0, stop: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Feedback samples: "original", "inverted" (1 - x), "transposed" strokes, or "poison" (random labels)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    if phase == "inverted":
        x = 1.0 - x
    elif phase == "transposed":
        x = x.reshape(-1, 8, 8).transpose(0, 2, 1).reshape(-1, 64)
    labels = [str(v) for v in y]
    if phase == "poison":
        labels = [str(v) for v in np.random.default_rng(seed).integers(0, 10, len(y))]
    stop = len(y) if stop is None else stop
    return [{"id": f"{phase}-{i}", "label": labels[i], "x": x[i].tolist()} for i in range(start, stop)]
