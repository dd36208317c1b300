"""The running service's life: the HTTP server thread, sd_notify, the watchdog, SIGTERM.

``continual serve`` calls :func:`run` with a built context. The order is the
contract systemd relies on (``Type=notify``):

1. the caller has opened the store, checked its schema and loaded the champion;
2. the HTTP server binds its port (in a thread, so uvicorn does not install its own
   signal handlers, which would re-raise SIGTERM and exit by signal instead of 0);
3. ``READY=1`` with a ``STATUS=`` line;
4. a supervisor thread runs health checks every ``WATCHDOG_USEC / 2`` (at most
   every 5 s) and sends ``WATCHDOG=1`` only when all pass, ``STATUS=`` when the
   state line changes, and sets ``continual_store_up``;
5. SIGTERM/SIGINT: ``STOPPING=1``, stop accepting connections, run the
   ``on_stop`` callbacks (the scheduler cancels a training run there) while
   in-flight requests finish, then exit 0 within ``[service] shutdown_timeout_seconds``.
   A second signal skips the wait.

What it supervises comes in one :class:`Runtime`, built by the composition root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from continual.config import Settings
from continual.metrics import Metrics
from continual.service.sdnotify import Notifier

log = logging.getLogger("continual.lifecycle")

# A health check returns None when healthy, else one line saying what is wrong.
# Any problem withholds WATCHDOG=1, so systemd restarts a service that is stuck.
HealthCheck = Callable[[], str | None]

DEFAULT_TICK_SECONDS = 5.0


@dataclass
class Runtime:
    """What :func:`run` supervises besides the app.

    ``state`` and ``version`` feed the ``STATUS=`` line; ``health_checks`` gate
    ``WATCHDOG=1``; ``on_stop`` runs once on SIGTERM, in order, while in-flight
    requests finish.
    """

    settings: Settings
    metrics: Metrics
    ping: Callable[[], bool]
    state: Callable[[], str]
    version: Callable[[], str | None] = lambda: None
    health_checks: Sequence[HealthCheck] = ()
    on_stop: Sequence[Callable[[], None]] = ()


def status_line(
    state: str, address: str, *, version: str | None = None, store_ok: bool = True, problems: Sequence[str] = ()
) -> str:
    """The one-line ``STATUS=`` text: state first, because ``systemctl status`` truncates."""
    parts = [state, f"serving on {address}", f"champion {version}" if version else "no champion yet"]
    if not store_ok:
        parts.append("store unreachable")
    if problems:
        parts.append("unhealthy: " + "; ".join(problems))
    return ", ".join(parts)


def run_checks(checks: Sequence[HealthCheck]) -> list[str]:
    problems = []
    for check in checks:
        try:
            problem = check()
        except Exception as e:  # a check that crashes is itself a failed check
            problem = f"{getattr(check, '__name__', 'check')} raised {type(e).__name__}: {e}"
        if problem:
            problems.append(problem)
    return problems


class ServerThread:
    """uvicorn in a daemon thread with its own event loop."""

    def __init__(self, app: ASGIApp, *, host: str, port: int, log_level: str, graceful_seconds: float) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=max(1, round(graceful_seconds))
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="continual-http", daemon=True)

    def _run(self) -> None:
        with asyncio.Runner() as runner:
            self.loop = runner.get_loop()
            try:
                runner.run(self.server.serve())
            except SystemExit:  # uvicorn exits this way when it cannot bind or the lifespan fails
                log.error("the HTTP server stopped during start-up")

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def wait_started(self, stop: threading.Event, poll: float = 0.02) -> bool:
        """True once the port is bound; False if the thread died first or ``stop`` was set."""
        while not self.started:
            if not self.alive or stop.wait(poll):
                return False
        return True

    @property
    def address(self) -> str:
        cfg = self.server.config
        port = cfg.port
        for srv in getattr(self.server, "servers", []):
            for sock in srv.sockets or ():
                port = sock.getsockname()[1]
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        return f"http://{host}:{port}"

    def loop_responsive(self, timeout: float) -> str | None:
        """A health check: the event loop runs a no-op within ``timeout`` seconds."""
        loop = self.loop
        if loop is None or loop.is_closed() or not self.alive:
            return "the HTTP server is not running"
        try:
            fut = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop)
        except RuntimeError:
            return "the HTTP server's event loop is closed"
        try:
            fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            return f"the HTTP event loop did not answer within {timeout:.1f}s"
        return None

    def stop(self, timeout: float) -> bool:
        """Stop accepting, let in-flight requests finish (uvicorn's graceful timeout), join."""
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("in-flight requests did not finish in %.0fs; closing them", timeout)
            self.server.force_exit = True
            self._thread.join(5)
        return not self._thread.is_alive()


class Supervisor:
    """Health checks on a timer: WATCHDOG=1 when they pass, STATUS= when the line changes, store_up always.

    The store ping is reported (STATUS=, ``continual_store_up``) but does not gate the
    watchdog: with the store down, feedback answers 503 and predictions continue, and
    the service must recover by itself when the store returns. A restart would only
    make things worse (start-up needs the store). It runs in its own thread so a
    store that hangs cannot stall the keep-alive either.
    """

    def __init__(
        self,
        *,
        notifier: Notifier,
        metrics: Metrics,
        ping: Callable[[], bool],
        checks: Sequence[HealthCheck],
        status: Callable[[bool, list[str]], str],
        interval: float,
        initial_status: str = "",
    ) -> None:
        self.notifier, self.metrics, self.checks, self.interval = notifier, metrics, list(checks), interval
        self._ping, self._status = ping, status
        self._last_status = initial_status
        self._pinger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="continual-store-ping")
        self._ping_future: Future[bool] | None = None
        self._ping_started = 0.0
        self.store_ok = True

    def _check_store(self) -> bool:
        fut = self._ping_future
        if fut is None or fut.done():
            if fut is not None:
                self.store_ok = _result_or_false(fut)
            self._ping_future = fut = self._pinger.submit(self._ping)
            self._ping_started = time.monotonic()
        # Wait briefly so a healthy store is reported in this tick, never longer than half a tick.
        with contextlib.suppress(TimeoutError):
            self.store_ok = _result_or_false(fut, timeout=min(2.0, self.interval / 2))
            return self.store_ok
        if time.monotonic() - self._ping_started > self.interval:
            self.store_ok = False  # a ping that hangs for a whole tick is an outage
        return self.store_ok

    def tick(self) -> bool:
        """One round; returns whether every health check passed."""
        store_ok = self._check_store()
        self.metrics.store_up.set(1 if store_ok else 0)
        problems = run_checks(self.checks)
        if problems:
            log.error("unhealthy, withholding WATCHDOG=1 (systemd restarts after WatchdogSec): %s", "; ".join(problems))
        else:
            self.notifier.watchdog()
        line = self._status(store_ok, problems)
        if line != self._last_status:
            self.notifier.status(line)
            self._last_status = line
        return not problems

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # the supervisor must outlive any one bad round
                log.exception("supervisor round failed")
            stop.wait(self.interval)
        self._pinger.shutdown(wait=False, cancel_futures=True)


def _result_or_false(fut: Future[bool], timeout: float | None = None) -> bool:
    try:
        return bool(fut.result(timeout))
    except TimeoutError:
        raise
    except Exception as e:
        log.warning("store ping failed: %s", e)
        return False


@contextlib.contextmanager
def _signals(stop: threading.Event, server: ServerThread) -> Iterator[None]:
    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second %s: not waiting for in-flight requests", signal.Signals(signum).name)
            server.server.force_exit = True
        else:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(app: ASGIApp, rt: Runtime, notifier: Notifier) -> int:
    """Serve ``app`` until SIGTERM/SIGINT; 0 on a clean stop, 1 if the server could not start or died."""
    settings, metrics = rt.settings, rt.metrics
    grace = settings.service.shutdown_timeout_seconds
    server = ServerThread(
        app,
        host=settings.service.host,
        port=settings.service.port,
        log_level=settings.service.log_level,
        graceful_seconds=grace,
    )
    stop, supervisor_stop = threading.Event(), threading.Event()
    with _signals(stop, server):
        server.start()
        if not server.wait_started(stop):
            if stop.is_set():
                server.stop(grace)
                return 0
            log.error("could not start the HTTP server on %s:%d", settings.service.host, settings.service.port)
            return 1

        address = server.address
        # At most 5 s even with a long WatchdogSec, so STATUS= follows state changes closely.
        tick = min(notifier.watchdog_seconds or DEFAULT_TICK_SECONDS, DEFAULT_TICK_SECONDS)

        def status(store_ok: bool, problems: list[str]) -> str:
            return status_line(rt.state(), address, version=rt.version(), store_ok=store_ok, problems=problems)

        ready_line = status(True, [])
        notifier.ready(ready_line)
        log.info("ready: %s", ready_line)
        supervisor = Supervisor(
            notifier=notifier,
            metrics=metrics,
            ping=rt.ping,
            checks=[lambda: server.loop_responsive(timeout=max(1.0, tick)), *rt.health_checks],
            status=status,
            interval=tick,
            initial_status=ready_line,
        )
        threading.Thread(target=supervisor.run, args=(supervisor_stop,), name="continual-watchdog", daemon=True).start()

        code = 0
        while not stop.wait(0.5):
            if not server.alive:
                log.error("the HTTP server stopped unexpectedly")
                code = 1
                break

        supervisor_stop.set()
        notifier.stopping("stopping: finishing in-flight requests")
        server.server.should_exit = True  # stop accepting now; on_stop runs while requests drain
        for hook in rt.on_stop:
            try:
                hook()
            except Exception:
                log.exception("stop hook %s failed", getattr(hook, "__name__", hook))
        if not server.stop(grace + 5):
            log.error("the HTTP server did not stop")
            code = code or 1
    log.info("stopped")
    return code
