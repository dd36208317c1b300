"""A worker notices when the service that started it is gone.

The worker runs in its own process group (so a cancel reaches its DataLoader
workers and torchrun's ranks), which also means a ``kill -9`` of the service does
not reach it. Left alone it would train on, write a candidate nobody gates and
compete with the restarted service's own run. The launcher passes the service's
pid in the environment; the worker polls it and stops when it is gone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from continual.procutil import process_alive

log = logging.getLogger("continual.learn.orphan")

SERVICE_PID_ENV = "CONTINUAL_SERVICE_PID"
__all__ = ["SERVICE_PID_ENV", "process_alive", "watch_service"]


def watch_service(
    on_gone: Callable[[], None], *, pid: int | None = None, interval: float = 1.0
) -> threading.Thread | None:
    """Call ``on_gone`` once when the service (``pid``, default from the environment) stops running.

    Returns the daemon thread, or None when no service pid is known (a worker started by hand).
    """
    if pid is None:
        raw = os.environ.get(SERVICE_PID_ENV, "")
        if not raw.isdigit():
            return None
        pid = int(raw)
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(interval):
            if not process_alive(pid):
                log.error("the service (pid %d) that started this run is gone: stopping", pid)
                on_gone()
                return

    thread = threading.Thread(target=watch, name="service-watch", daemon=True)
    thread.start()
    return thread
