"""A client for systemd's notify socket (``sd_notify``), standard library only.

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract
namespace) to ``Type=notify`` services, and ``WATCHDOG_USEC`` when ``WatchdogSec=``
is set. Each notification is one datagram of newline-separated ``KEY=value``
assignments. Without ``NOTIFY_SOCKET`` every call is a no-op, so the same code runs
under systemd, in a terminal and in tests.

>>> n = Notifier(None)
>>> n.enabled, n.ready("idle")
(False, False)
>>> watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=1)
15.0
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("continual.sdnotify")

_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class NotifySocketError(ValueError):
    """``NOTIFY_SOCKET`` or ``WATCHDOG_USEC`` holds a value this client cannot use."""

    def __init__(self, variable: str, value: str, why: str) -> None:
        super().__init__(f"{variable}={value!r}: {why}")
        self.variable, self.value = variable, value


def socket_address(value: str) -> str | bytes:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value: a path, or ``@name`` → abstract ``\\0name``."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise NotifySocketError(
        "NOTIFY_SOCKET",
        value,
        "must be an absolute socket path or '@name' (abstract namespace); other kinds (vsock) are not supported",
    )


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises).

    None when the watchdog is off, or when ``WATCHDOG_PID`` names another process.
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        raise NotifySocketError("WATCHDOG_USEC", raw, "must be a positive integer (microseconds)") from None
    if usec <= 0:
        raise NotifySocketError("WATCHDOG_USEC", raw, "must be a positive integer (microseconds)")
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notifications to one socket; every method returns whether a datagram went out.

    After :meth:`stopping`, :meth:`watchdog` sends nothing, so a keep-alive from a
    background thread can never follow ``STOPPING=1``.
    """

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address or None
        self.watchdog_seconds = watchdog_seconds
        self._target = socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._warned = False

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """Read ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``; ``unset`` removes them so child processes
        (training workers) do not inherit a socket that belongs to the main process."""
        env = os.environ if env is None else env
        notifier = cls(env.get("NOTIFY_SOCKET") or None, watchdog_interval(env))
        if unset:
            for name in _ENV_VARS:
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *assignments: str) -> bool:
        return self._send(assignments)

    def _send(self, assignments: tuple[str, ...], *, keepalive: bool = False) -> bool:
        if self._target is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        with self._lock:
            # Checked under the lock: a keep-alive racing with stopping() either goes out first or not at all.
            if keepalive and self._stopping:
                return False
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._target)
            except OSError as e:
                # Notifications are advisory: a missing listener must never take the service down.
                if not self._warned:
                    log.warning("cannot send to NOTIFY_SOCKET %s: %s", self.address, e)
                    self._warned = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        return self._send(("WATCHDOG=1",), keepalive=True)

    def stopping(self, status: str | None = None) -> bool:
        with self._lock:
            self._stopping = True
        return self.send("STOPPING=1", *_status(status))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    # A newline would start a new assignment; systemd shows STATUS= as one line anyway.
    return () if text is None else ("STATUS=" + " ".join(text.split()),)
