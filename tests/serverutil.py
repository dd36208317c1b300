"""Run a real ``continual serve`` child process on a loopback port, for end-to-end tests.

    with running_server({"auth": {"enabled": False}}) as url:
        httpx.get(url + "/healthz")

``ServerProcess`` gives finer control (kill -9 and restart on the same data).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from testkit import merge, to_toml, wait_for

# A tiny vector model: starts fast, no weights to download.
BASE_CONFIG: dict[str, Any] = {
    "service": {"host": "127.0.0.1", "log_level": "warning"},
    "auth": {"enabled": False},
    "model": {
        "architecture": "mlp",
        "weights": "none",
        "classes": [str(i) for i in range(10)],
        "hidden": [16],
        "input": {"kind": "vector", "shape": [64]},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One ``continual serve`` child in its own process group, logging to ``<workdir>/server.log``."""

    def __init__(
        self, config: str | Mapping[str, Any] | None = None, *, workdir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = to_toml(merge(BASE_CONFIG, config or {})) if not isinstance(config, str) else config
        self.config_path = self.workdir / "config.toml"
        self.config_path.write_text(text, encoding="utf-8")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "server.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
        self.env.update({"CONTINUAL_CONFIG": str(self.config_path), "CONTINUAL_SERVICE__PORT": str(self.port)})
        if "data_dir" not in tomllib.loads(text).get("service", {}):
            self.env["CONTINUAL_SERVICE__DATA_DIR"] = str(self.workdir / "data")
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._upgraded = False

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``continual ARGS`` against this server's config."""
        return subprocess.run(
            [sys.executable, "-m", "continual.cli", *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def start(self, timeout: float = 60.0) -> str:
        if not self._upgraded:
            self.cli("db", "upgrade")
            self._upgraded = True
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "continual.cli", "serve"],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches every child
            )
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"continual serve exited with {proc.returncode}:\n{self.log_tail()}")
            return httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200

        try:
            wait_for(healthy, timeout, "continual serve answering /healthz", 0.1)
        except TimeoutError as e:
            self.kill()
            raise TimeoutError(f"{e}:\n{self.log_tail()}") from None
        return self.url

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (also children left behind by an exited server)."""
        # Once reaped, the pid (and so the group id) may belong to another process:
        # never signal a group whose leader we already waited for.
        if self.proc is None or self.proc.returncode is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self.kill()

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


@contextmanager
def running_server(
    config: str | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    workdir: Path | None = None,
) -> Iterator[str]:
    """Start a server (``db upgrade`` first), yield its base URL, stop it and its process group."""
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="continual-server-")
    server = ServerProcess(config, workdir=workdir or Path(tmp.name), env=env)  # type: ignore[union-attr]
    try:
        yield server.start()
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()
