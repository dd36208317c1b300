"""sd_notify: the client on real sockets, the supervisor, and a real ``continual serve`` under a notify socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from serverutil import ServerProcess, free_port
from testkit import wait_for

from continual.config import settings_from_dict
from continual.metrics import Metrics
from continual.service import runtime
from continual.service.context import State
from continual.service.sdnotify import Notifier, NotifySocketError, socket_address, watchdog_interval
from continual.store import Store


class Listener:
    """A notify socket like systemd's: one datagram per notification, split into assignments."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.items: list[str] = []

    def wait_for(self, item: str, timeout: float) -> list[str]:
        """Receive until ``item`` arrives; returns everything received so far. Fails on timeout."""
        return self.wait_until(lambda items: item in items, timeout, f"{item!r}")

    def wait_until(self, done: Callable[[list[str]], bool], timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        while not done(self.items):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what} did not arrive within {timeout}s; got {self.items}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.items.extend(data.decode().split("\n"))
        return self.items

    def drain(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.items.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                break
        return self.items

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    # Abstract namespace: no path-length limit, nothing left on disk, and it exercises "@".
    lis = Listener(f"@continual-test-{uuid.uuid4().hex}")
    yield lis
    lis.close()


# -- the client ------------------------------------------------------------------------
def test_no_socket_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False and n.stopping() is False


def test_path_socket_receives_assignments(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    lis = Listener(path)
    try:
        n = Notifier(path)
        assert n.ready("idle,\nline two") and n.watchdog() and n.stopping("bye")
        items = lis.drain(0.5)
    finally:
        lis.close()
    # A newline in the status must not smuggle in a second assignment.
    assert items == ["READY=1", "STATUS=idle, line two", "WATCHDOG=1", "STOPPING=1", "STATUS=bye"]


def test_no_watchdog_after_stopping(listener: Listener) -> None:
    n = Notifier(listener.address)
    n.watchdog()
    n.stopping()
    assert n.watchdog() is False
    assert listener.drain(0.3) == ["WATCHDOG=1", "STOPPING=1"]


def test_from_env_unsets_for_children() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "1"}
    n = Notifier.from_env(env, unset=True)
    assert n.enabled and n.watchdog_seconds == 2.0
    assert env == {"OTHER": "1"}


def test_missing_listener_does_not_raise(tmp_path: Path) -> None:
    assert Notifier(str(tmp_path / "nobody-listens.sock")).ready() is False


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@"])
def test_bad_notify_socket_names_the_variable(value: str) -> None:
    with pytest.raises(NotifySocketError, match="NOTIFY_SOCKET"):
        Notifier(value)


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000"}, pid=7) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "8"}, pid=7) is None
    for bad in ("soon", "0", "-5"):
        with pytest.raises(NotifySocketError, match="WATCHDOG_USEC"):
            watchdog_interval({"WATCHDOG_USEC": bad})


# -- the supervisor ----------------------------------------------------------------------
def test_failed_health_check_withholds_watchdog(listener: Listener) -> None:
    problem: list[str | None] = [None]
    metrics = Metrics()
    sup = runtime.Supervisor(
        notifier=Notifier(listener.address),
        metrics=metrics,
        ping=lambda: True,
        checks=[lambda: problem[0]],
        status=lambda store_ok, problems: runtime.status_line("idle", "http://x:1", problems=problems),
        interval=1.0,
        initial_status=runtime.status_line("idle", "http://x:1"),
    )
    assert sup.tick() is True
    problem[0] = "scheduler thread died"
    assert sup.tick() is False
    problem[0] = None
    assert sup.tick() is True
    assert listener.drain(0.3) == [
        "WATCHDOG=1",
        "STATUS=idle, serving on http://x:1, no champion yet, unhealthy: scheduler thread died",
        "WATCHDOG=1",
        "STATUS=idle, serving on http://x:1, no champion yet",
    ]
    assert metrics.registry.get_sample_value("continual_store_up") == 1


def test_store_down_is_reported_but_keeps_the_watchdog(listener: Listener) -> None:
    # With the store down the service answers 503 and keeps predicting; a restart would not help.
    metrics = Metrics()
    sup = runtime.Supervisor(
        notifier=Notifier(listener.address),
        metrics=metrics,
        ping=lambda: False,
        checks=[],
        status=lambda store_ok, problems: runtime.status_line("idle", "http://x:1", store_ok=store_ok),
        interval=1.0,
    )
    assert sup.tick() is True
    assert listener.drain(0.3) == [
        "WATCHDOG=1",
        "STATUS=idle, serving on http://x:1, no champion yet, store unreachable",
    ]
    assert metrics.registry.get_sample_value("continual_store_up") == 0


def test_run_in_process_uses_the_runtime(tmp_path: Path, listener: Listener) -> None:
    """runtime.run on the main thread: READY after bind, health checks gate the watchdog, SIGTERM runs on_stop, 0."""
    stopped: list[str] = []
    sick = threading.Event()
    rt = _runtime(
        tmp_path,
        state=lambda: "training",
        health_checks=[lambda: "scheduler stuck" if sick.is_set() else None],
        on_stop=[lambda: stopped.append("cancelled training")],
    )
    settings = rt.settings
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"ok": "yes"}

    seen: dict[str, object] = {}

    def drive() -> None:
        try:
            listener.wait_for("READY=1", 30)
            seen["ping"] = httpx.get(f"http://127.0.0.1:{settings.service.port}/ping", timeout=5).json()
            listener.wait_for("WATCHDOG=1", 10)
            sick.set()
            items = listener.wait_until(lambda items: any("unhealthy" in i for i in items), 15, "unhealthy STATUS=")
            seen["sick"] = next(i for i in items if "unhealthy" in i)
        finally:
            _sigterm_self()

    t = threading.Thread(target=drive)
    t.start()
    try:
        code = runtime.run(app, rt, Notifier(listener.address, watchdog_seconds=0.2))
    finally:
        t.join(30)
    assert code == 0
    assert seen["ping"] == {"ok": "yes"}
    assert str(seen["sick"]).startswith("STATUS=training, serving on http://127.0.0.1:")
    assert "unhealthy: scheduler stuck" in str(seen["sick"])
    assert stopped == ["cancelled training"]
    items = listener.wait_for("STOPPING=1", 10)
    sick_at = items.index(seen["sick"])
    # No keep-alive while the check failed, nor after STOPPING=1.
    assert "WATCHDOG=1" not in items[sick_at:]


def _runtime(tmp_path: Path, **kw: Any) -> runtime.Runtime:
    settings = settings_from_dict(
        {"service": {"port": free_port(), "data_dir": str(tmp_path), "shutdown_timeout_seconds": 5}}
    )
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    return runtime.Runtime(settings=settings, metrics=Metrics(), ping=store.ping, **{"state": lambda: "idle", **kw})


def _sigterm_self() -> None:
    # Only while run() has its handler installed: the default action would kill pytest.
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tmp_path: Path, listener: Listener) -> None:
    rt = _runtime(tmp_path)
    url = f"http://127.0.0.1:{rt.settings.service.port}"
    entered, release = threading.Event(), threading.Event()
    app = FastAPI()

    @app.get("/slow")
    def slow() -> dict[str, str]:
        entered.set()
        release.wait(10)
        return {"done": "yes"}

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"ok": "yes"}

    seen: dict[str, object] = {}

    def request() -> None:
        r = httpx.get(url + "/slow", timeout=20)
        seen["slow"] = (r.status_code, r.json())

    def drive() -> None:
        try:
            listener.wait_for("READY=1", 30)
            threading.Thread(target=request).start()
            seen["entered"] = entered.wait(10)
            _sigterm_self()
            seen["signalled"] = True
            listener.wait_for("STOPPING=1", 10)

            # The request is still held: the port must close to newcomers meanwhile.
            def refused() -> bool:
                try:
                    httpx.get(url + "/ping", timeout=1)
                except httpx.ConnectError:
                    return True
                except httpx.TransportError:
                    pass  # accepted just before the listener closed, then dropped: try again
                return False

            seen["refused"] = wait_for(refused, 10, "the port refusing new connections", 0.05)
        finally:
            release.set()
            if not seen.get("signalled"):  # a second SIGTERM would skip the drain under test
                _sigterm_self()

    t = threading.Thread(target=drive)
    t.start()
    try:
        code = runtime.run(app, rt, Notifier(listener.address))
    finally:
        release.set()
        t.join(30)
    assert code == 0
    assert seen.get("entered") is True
    assert seen.get("refused") is True
    assert seen.get("slow") == (200, {"done": "yes"})


def test_status_line_names_state_champion_and_trouble() -> None:
    m = Metrics()
    state = State(m)
    assert state.current == "starting" and m.registry.get_sample_value("continual_state", {"state": "starting"}) == 1
    state.set("training")
    assert m.registry.get_sample_value("continual_state", {"state": "training"}) == 1
    assert m.registry.get_sample_value("continual_state", {"state": "starting"}) == 0
    with pytest.raises(ValueError, match="state must be one of"):
        state.set("napping")
    line = runtime.status_line(
        state.current, "http://127.0.0.1:8000", version="v7", store_ok=False, problems=["scheduler stuck"]
    )
    assert (
        line == "training, serving on http://127.0.0.1:8000, champion v7, store unreachable, unhealthy: scheduler stuck"
    )


# -- a real `continual serve` --------------------------------------------------------
@pytest.mark.slow
def test_serve_notifies_ready_status_watchdog_stopping(tmp_path: Path, listener: Listener) -> None:
    server = ServerProcess(workdir=tmp_path, env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "1000000"})
    server.cli("db", "upgrade")
    # Started by hand, not with server.start(): nothing may poll the port before READY=1 does.
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "continual.cli", "serve"],
            env=server.env,
            cwd=server.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        items = listener.wait_for("READY=1", 90)
        # READY=1 comes after the port is bound: the server answers at once.
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        items = listener.wait_for("WATCHDOG=1", 10)
        ready = items.index("READY=1")
        status = next(i for i, item in enumerate(items) if item.startswith("STATUS=") and i > ready)
        watchdog = items.index("WATCHDOG=1")
        assert ready < status < watchdog, items
        assert items[status].startswith("STATUS=idle, serving on http://127.0.0.1:"), items[status]
        assert items[0].startswith("STATUS=starting"), items

        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        items = listener.wait_for("STOPPING=1", 10)
        assert server.proc.wait(timeout=15) == 0, server.log_tail()
        assert "WATCHDOG=1" not in items[items.index("STOPPING=1") :]
    finally:
        server.stop()


@pytest.mark.slow
def test_serve_without_its_port_exits_1_and_never_says_ready(tmp_path: Path, listener: Listener) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(
            workdir=tmp_path, env={"NOTIFY_SOCKET": listener.address, "CONTINUAL_SERVICE__PORT": str(port)}
        )
        server.cli("db", "upgrade")
        with pytest.raises(RuntimeError, match="exited with 1"):
            server.start(timeout=90)
    assert "READY=1" not in listener.drain(0.3)
    assert "could not start the HTTP server" in server.log_tail()
