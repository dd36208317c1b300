"""What the running service's jobs share: built once by :func:`continual.service.app.build`, passed explicitly."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field

from continual.config import Settings
from continual.drift.windows import EmbeddingCache
from continual.learn.launch import RunHandle
from continual.metrics import STATES, Metrics
from continual.registry import Registry
from continual.serving import Serving
from continual.store import Store

TRAINER_LEASE = "trainer"


class State:
    """What the service is doing now (``idle``, ``training``, ...); mirrored into ``continual_state{state}``."""

    def __init__(self, metrics: Metrics, initial: str = "starting") -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._current = ""
        self.set(initial)

    @property
    def current(self) -> str:
        return self._current

    def set(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        with self._lock:
            self._current = state
            self._metrics.set_state(state)


@dataclass
class ServiceContext:
    """Everything the scheduler jobs touch."""

    settings: Settings
    store: Store
    registry: Registry
    metrics: Metrics
    state: State
    serving: Serving | None = None  # None in a trainer-only process (role = "trainer")
    config_path: str | None = None  # handed to training workers for the store connection
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stop: threading.Event = field(default_factory=threading.Event)
    handle: RunHandle | None = None  # the training worker running now, if any
    # Repeated drift checks against one champion reuse its model and embeddings.
    drift_cache: EmbeddingCache = field(default_factory=EmbeddingCache)

    @property
    def lease_ttl(self) -> float:
        # Renewed every tick and every few seconds during a run; a crashed holder frees it soon.
        return max(30.0, 3 * self.settings.triggers.check_interval_seconds)

    def hold_trainer_lease(self) -> bool:
        """Take or renew the trainer lease; False while another process holds it."""
        return self.store.leases.try_acquire(TRAINER_LEASE, self.holder, self.lease_ttl)
