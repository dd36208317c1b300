"""Shared builders for the ingest/API tests: settings, images, an app over a real store."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from testkit import merge

from continual.config import Settings, settings_from_dict

CLASSES = ["cat", "dog", "bird"]


def vector_settings(tmp_path: Path, **over: Any) -> Settings:
    base = {
        "service": {"data_dir": str(tmp_path / "data")},
        "auth": {"enabled": False},
        "model": {
            "architecture": "mlp",
            "weights": "none",
            "classes": CLASSES,
            "input": {"kind": "vector", "shape": [4]},
        },
    }
    return settings_from_dict(merge(base, over))


def image_settings(tmp_path: Path, **over: Any) -> Settings:
    base = {
        "service": {"data_dir": str(tmp_path / "data")},
        "auth": {"enabled": False},
        "model": {"architecture": "mlp", "weights": "none", "classes": CLASSES, "input": {"kind": "image"}},
    }
    return settings_from_dict(merge(base, over))


def image_bytes(w: int = 8, h: int = 6, mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    img = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
    if mode not in ("RGB", "L"):
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_client(settings: Settings, store_url: str):  # type: ignore[no-untyped-def]
    """A TestClient over the real app and a real, migrated store; returns (client, store, metrics)."""
    from continual.api import AppContext, create_app
    from continual.metrics import Metrics
    from continual.store import Store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    store = Store(store_url, max_payload_bytes=settings.store.max_payload_bytes, busy_timeout_ms=200)
    store.upgrade()
    metrics = Metrics()
    return TestClient(create_app(AppContext(settings, store, metrics))), store, metrics
