"""What the routes use, built once by the service (``continual.service.app``) and passed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from continual.config import Settings
from continual.metrics import Metrics
from continual.registry import Registry
from continual.serving import Serving
from continual.store import Store


@dataclass
class AppContext:
    settings: Settings
    store: Store
    metrics: Metrics
    registry: Registry | None = None  # None only in tests that exercise ingestion alone
    serving: Serving | None = None  # None in a trainer-only process (role = "trainer")
    state: Callable[[], str] = lambda: "unknown"  # what the service is doing (``/v1/status``)
