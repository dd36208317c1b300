"""Shared builders for the learning tests (no tests here): digits vectors, settings, a config file."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from continual.config import Settings, settings_from_dict
from continual.store import NewSample, Store


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(i) for i in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """A config.toml from a nested dict of sections (one level of sub-tables, e.g. [model.input])."""
    lines: list[str] = []

    def section(name: str, body: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items() if not isinstance(v, dict))
        for k, v in subs.items():
            section(f"{name}.{k}", v)

    for name, body in data.items():
        section(name, body)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
