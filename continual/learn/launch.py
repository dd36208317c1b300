"""Start a training run in a child process (locally or under torchrun), wait for it, cancel it.

The service imports this module, never the training code: no torch, no CUDA
initialisation in the service process. The child runs in its own process group,
so a cancel reaches its DataLoader workers and torchrun's ranks too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from continual.config import Settings
from continual.learn.orphan import SERVICE_PID_ENV
from continual.store import RunNotPending, Store
from continual.store.runs import FINISHED

# The worker process (its composition root: store, registry, signals); it runs continual.learn.run.execute_run.
WORKER_MODULE = "continual.service.worker"


def worker_command(settings: Settings, run_id: int, config_path: str | os.PathLike[str] | None) -> list[str]:
    """The argv of the worker (``python -m continual.service.worker``), or the same under torchrun.

    ``--config`` gives the worker its store connection only; what it trains comes from the run spec.
    """
    t = settings.training
    # torchrun's parser takes "--run" for an ambiguous abbreviation of its --run-path: say --run-id there.
    tail = ["-m", WORKER_MODULE, "--run" if t.launcher == "local" else "--run-id", str(run_id)]
    if config_path is not None:
        tail += ["--config", str(config_path)]
    if t.launcher == "local":
        return [sys.executable, *tail]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={t.nproc_per_node}"]
    if t.nnodes == 1 and not t.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        # Other hosts join with the same command, rendezvous id and endpoint.
        cmd += [
            f"--nnodes={t.nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={t.rdzv_endpoint}",
            f"--rdzv_id=continual-run-{run_id}",
        ]
    return [*cmd, *tail]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the worker was killed by {name}"
    return f"the worker exited with status {returncode} without recording an outcome"


class RunHandle:
    """A running worker. ``wait`` and ``cancel`` record an outcome the worker could not record itself."""

    def __init__(self, run_id: int, process: subprocess.Popen[bytes], store: Store, log_path: Path | None) -> None:
        self.run_id, self.process, self.store, self.log_path = run_id, process, store, log_path
        self._cancel_requested = False
        self._recorded = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None if still running after ``timeout`` seconds."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._record(code)
        return code

    def cancel(self, grace: float = 10.0) -> int:
        """SIGTERM the worker's process group; SIGKILL it if it has not stopped after ``grace`` seconds."""
        self._cancel_requested = True
        self._terminate(grace)
        code = self.process.returncode
        self._record(code)
        return code

    def abort(self, reason: str, grace: float = 10.0) -> int:
        """Fail the run with ``reason`` (recorded first), then SIGTERM, then SIGKILL after ``grace`` seconds.

        For a worker past its hard deadline: whatever it is stuck in, it goes, and the
        run says why — a worker that still records its own outcome afterwards changes nothing.
        """
        self.store.runs.finish(self.run_id, "failed", error=reason)
        self._recorded = True
        self._terminate(grace)
        self._signal(signal.SIGKILL)  # its DataLoader workers or torchrun ranks too
        return self.process.returncode

    def _terminate(self, grace: float) -> None:
        """SIGTERM the process group, then SIGKILL if the worker has not exited after ``grace`` seconds."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _record(self, code: int) -> None:
        if self._recorded:
            return
        self._recorded = True
        # Ranks or DataLoader workers orphaned by a killed parent must not train on.
        if code != 0:
            self._signal(signal.SIGKILL)
        status = "cancelled" if self._cancel_requested else "failed"
        reason = "cancelled: stop requested" if self._cancel_requested else describe_exit(code)
        if self.log_path is not None and status == "failed":
            reason += f" (log: {self.log_path})"
        self.store.runs.finish(self.run_id, status, error=reason)


def launch_run(
    settings: Settings,
    store: Store,
    run_id: int,
    config_path: str | os.PathLike[str] | None,
    *,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> RunHandle:
    """Spawn the worker for a pending run; its output goes to ``<data_dir>/runs/<run_id>.log``."""
    row = store.runs.get(run_id)
    if row["status"] != "pending":
        raise RunNotPending(run_id, row["status"])
    child_env = dict(os.environ if env is None else env)
    child_env[SERVICE_PID_ENV] = str(os.getpid())  # the worker stops if this process dies (see orphan.py)
    if config_path is None:
        # No file to read: the worker gets the store from the environment, the rest from the run spec.
        child_env["CONTINUAL_STORE__URL"] = store.url
    log_dir = log_dir or settings.service.data_dir / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{run_id}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            worker_command(settings, run_id, config_path),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    return RunHandle(run_id, process, store, log_path)


def wait_for_progress(
    store: Store, run_id: int, *, phase: str = "training", timeout: float = 60.0
) -> dict[str, object]:
    """Block until the run reports ``phase`` (tests and the CLI use it); returns the row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.runs.get(run_id)
        if row["status"] in FINISHED or (row.get("progress") or {}).get("phase") == phase:
            return row
        time.sleep(0.05)
    raise TimeoutError(f"training run {run_id} did not reach phase {phase!r} within {timeout:g} s")
