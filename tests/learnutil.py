"""Shared builders for the learning tests (no tests here): training settings and a filled store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from continual.config import Settings, settings_from_dict
from continual.learn.run import execute_run
from continual.registry import Registry
from continual.store import NewSample, Store


def settings_dict(data_dir: Path, store_url: str, **training: Any) -> dict[str, Any]:
    train = {
        "epochs": 3,
        "learning_rate": 1e-2,
        "head_learning_rate": 1e-2,
        "batch_size": 32,
        "device": "cpu",
        "cpu_threads": 1,
        "seed": 1,
        "replay_buffer": 500,
        "fisher_samples": 200,
        "ewc_lambda": 10.0,
    }
    train.update(training)
    return {
        "service": {"data_dir": str(data_dir)},
        "store": {"url": store_url},
        "model": {
            "architecture": "mlp",
            "weights": "none",
            "mode": "all",
            "hidden": [32],
            "input": {"kind": "vector", "shape": [64]},
        },
        "training": train,
    }


def make_settings(data_dir: Path, store_url: str, **training: Any) -> Settings:
    return settings_from_dict(settings_dict(data_dir, store_url, **training))


def fill(store: Store, x: np.ndarray, y: np.ndarray, prefix: str, *, source: str = "test") -> None:
    batch = [
        NewSample(f"{prefix}-{i}", str(int(y[i])), "vector", np.asarray(x[i], dtype="<f4").tobytes(), source=source)
        for i in range(len(x))
    ]
    for i in range(0, len(batch), 500):
        store.insert(batch[i : i + 500])


def run_here(store: Store, settings: Settings, run_id: int, **kw: Any) -> dict[str, Any]:
    """A pending run executed in this process, as the worker would (store from ``settings``, files in its data dir)."""
    return execute_run(
        store, settings.resolved_store(), run_id, open_files=lambda s: Registry(s.models_dir, store), **kw
    )
