"""The helpers every kind of test shares: config dicts and TOML, the digits data, polling.

Area-specific builders live beside their tests (``serverutil``: a real server;
``learnutil``: training settings and a filled store; ``looputil``: the service's
jobs over a fresh store; ``loadutil``: client load; ``ingestutil``: an app over a
real store) and build on these.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from continual.demo.digits import digit_vectors

T = TypeVar("T")


# -- config --------------------------------------------------------------------------------------------
def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Nested dicts of scalars and lists -> TOML (JSON scalars are valid TOML values)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {json.dumps(_plain(v))}")
    out = (f"[{prefix}]\n" if prefix and lines else "") + "".join(line + "\n" for line in lines)
    for k, v in tables:
        out += "\n" + to_toml(v, f"{prefix}.{k}" if prefix else k)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return v.as_posix()
    if isinstance(v, tuple):
        return [_plain(i) for i in v]
    return v


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(to_toml(data), encoding="utf-8")
    return path


# -- the digits data ------------------------------------------------------------------------------------
@cache
def digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 64-d vectors in [0, 1] and int64 labels."""
    x, y = digit_vectors()
    return x, y.astype(np.int64)


def digit_samples(
    phase: str = "original", start: int = 0, stop: int | None = None, *, prefix: str | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Feedback samples ``{"id", "label", "x"}`` number ``start`` to ``stop`` (the data set, cycled).

    ``phase``: "original", "inverted" (1 - x), "transposed" strokes, or "poison" (random
    labels). Ids are ``<prefix or phase>-<k>``.
    """
    x, y = digit_arrays()
    if phase == "inverted":
        x = 1.0 - x
    elif phase == "transposed":
        x = x.reshape(-1, 8, 8).transpose(0, 2, 1).reshape(-1, 64)
    elif phase != "original" and phase != "poison":
        raise ValueError(f"unknown phase {phase!r}")
    labels = np.random.default_rng(seed).integers(0, 10, len(y)) if phase == "poison" else y
    stop = len(y) if stop is None else stop
    name = prefix or phase
    n = len(y)
    return [{"id": f"{name}-{k}", "label": str(int(labels[k % n])), "x": x[k % n].tolist()} for k in range(start, stop)]


# -- waiting ------------------------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what`` otherwise.

    A connection error counts as "not yet" (a server restarting).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except httpx.TransportError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s (last: {last!r})")
        time.sleep(interval)
