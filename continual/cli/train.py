"""``continual train``: ask the service for a run, or train one in the foreground.

``continual train`` records a pending run (like ``POST /v1/train``): the service's
trainer starts it at its next check and gates it like any other run; ``--wait``
follows it to the gate's decision. ``continual train --now`` runs the same worker
process here, with a progress bar, and prints the candidate's metrics; nothing
gates or promotes that candidate (``continual models promote`` can).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from continual.cli.common import UserError, open_store, poll, settings_of
from continual.config import Settings, config_path
from continual.learn.launch import WORKER_MODULE, launch_run
from continual.learn.run import create_run, request_run
from continual.procutil import process_alive
from continual.store import Store
from continual.store.runs import FINISHED

# After a requested run succeeded: how long --wait waits for the gate's decision.
GATE_WAIT_SECONDS = 600.0
# After SIGTERM: a worker stops within one training step; this is generous.
CANCEL_WAIT_SECONDS = 120.0
_SHOWN = (
    "validation_accuracy",
    "validation_n",
    "new_samples",
    "replay_samples",
    "epochs_run",
    "best_epoch",
    "final_loss",
    "samples_per_s",
    "duration_seconds",
)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train", parents=[common], help="ask the service for a training run (gated), or train one now (--now)"
    )
    p.add_argument(
        "--now", action="store_true", help="train here in a child process and print the candidate (not gated)"
    )
    p.add_argument(
        "--cancel",
        action="store_true",
        help="cancel the active run (pending, or running on this host); nothing is written",
    )
    p.add_argument("--wait", action="store_true", help="without --now: follow the requested run to the gate's decision")
    p.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="with --wait: give up waiting after this long"
    )
    p.add_argument(
        "--strategy",
        choices=("naive", "replay", "ewc", "replay+ewc"),
        default=None,
        help="override [training] strategy (--now only)",
    )
    p.add_argument("--seed", type=int, default=None, help="override [training] seed (--now only)")
    p.add_argument("--json", action="store_true", help="print the finished run as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.cancel:
        if args.now or args.wait or args.timeout is not None or args.strategy or args.seed is not None:
            raise UserError("--cancel takes no other training option")
        return _cancel(open_store(settings_of(args)))
    if not args.now and (args.strategy or args.seed is not None):
        raise UserError("--strategy and --seed apply to --now only; a requested run uses the service's settings")
    if args.now and (args.wait or args.timeout is not None):
        raise UserError("--wait and --timeout apply to a requested run; --now always waits")
    if args.timeout is not None and (not args.wait or args.timeout <= 0):
        raise UserError("--timeout needs --wait and a positive number of seconds")
    settings = settings_of(args)
    store = open_store(settings)
    active = store.runs.active()
    if active:
        raise UserError(
            f"training run {active[0]['id']} is {active[0]['status']} already; wait for it or `continual train --cancel` it"
        )
    return _train_now(args, settings, store) if args.now else _request(args, settings, store)


def _cancel(store: Store) -> int:
    """A pending run is marked cancelled; a running one gets SIGTERM (its worker stops within a step, writes nothing)."""
    active = store.runs.active()
    if not active:
        raise UserError("no training run is pending or running")
    run = active[0]
    run_id = run["id"]
    if run["status"] == "pending" and not run["pid"]:
        if store.runs.finish(run_id, "cancelled", error="cancelled by the operator (continual train --cancel)"):
            print(f"training run {run_id}: cancelled (it had not started)")
            return 0
        run = store.runs.get(run_id)
        if run["status"] in FINISHED:
            print(f"training run {run_id}: {run['status']} already")
            return 0
    if run["host"] != socket.gethostname():
        raise UserError(f"training run {run_id} runs on {run['host']}; run `continual train --cancel` there")
    pid = int(run["pid"] or 0)
    if not pid or not process_alive(pid) or not _is_worker(pid):
        raise UserError(
            f"training run {run_id}: its worker (pid {pid or 'unknown'}) is not running; the service marks it"
        )
    # The worker leads (or, under torchrun, belongs to) its own process group: every rank hears it.
    os.killpg(os.getpgid(pid), signal.SIGTERM)
    print(f"training run {run_id}: SIGTERM sent to the worker (pid {pid}), waiting for it to stop ...", file=sys.stderr)
    row = poll(lambda: (r := store.runs.get(run_id))["status"] in FINISHED and r, CANCEL_WAIT_SECONDS)
    if row is None:
        print(f"training run {run_id} has not stopped after {CANCEL_WAIT_SECONDS:g} s", file=sys.stderr)
        return 2
    print(f"training run {run_id}: {row['status']}" + (f" ({row['error']})" if row.get("error") else ""))
    return 0 if row["status"] in ("cancelled", "interrupted") else 1


def _is_worker(pid: int) -> bool:
    """Whether ``pid`` is a continual training worker (not an unrelated process that reused the pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return WORKER_MODULE.encode() in f.read()
    except OSError:
        return True  # no /proc: trust the live pid


def _request(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    run_id = request_run(store, settings, actor="cli")
    every = settings.triggers.check_interval_seconds
    print(
        f"training run {run_id} requested: the service's trainer starts it at its next check (every {every:g} s) "
        "and gates it like any other run",
        file=sys.stderr,
    )
    if not args.wait:
        print(run_id)
        return 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def finished() -> bool:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        if store.runs.get(run_id)["status"] in FINISHED:
            return True
        time.sleep(0.5)
        return False

    try:
        _follow(store, run_id, finished, quiet=args.quiet)
        row = store.runs.get(run_id)
        # The trainer gates right after the run (same tick); a gate that never decides
        # (the service died in between) must not keep this command forever.
        decision = None
        if row["status"] == "succeeded":
            left = GATE_WAIT_SECONDS if deadline is None else min(GATE_WAIT_SECONDS, deadline - time.monotonic())
            decision = poll(lambda: store.records.decision_for_run(run_id), left, interval=0.5)
            if decision is None:
                print(
                    f"training run {run_id} succeeded but the gate has not decided on "
                    f"{row['candidate_version']}; see `continual status` and the service log",
                    file=sys.stderr,
                )
                return 2
    except TimeoutError:
        print(f"stopped waiting after {args.timeout:g} s; training run {run_id} goes on", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped waiting; training run {run_id} goes on (`continual status` follows it)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({**row, "decision": decision}, indent=2, default=str))
    else:
        _print_row(row)
        if decision is not None:
            print(f"  gate: {decision['outcome']} (rule {decision['rule']}): {'; '.join(decision['reasons'] or [])}")
    return 0 if row["status"] == "succeeded" else 1


def _train_now(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    if args.strategy:
        settings = settings.model_copy(
            update={"training": settings.training.model_copy(update={"strategy": args.strategy})}
        )
    run_id = create_run(store, settings, trigger="cli", seed=args.seed)
    path = config_path(args.config)
    handle = launch_run(settings, store, run_id, path if path.is_file() else None)
    print(f"training run {run_id} started (pid {handle.pid}, log {handle.log_path})", file=sys.stderr)
    try:
        _follow(store, run_id, lambda: handle.wait(0.25) is not None, quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"cancelling training run {run_id} ...", file=sys.stderr)
        handle.cancel()
        return 130
    row = store.runs.get(run_id)
    if args.json:
        print(json.dumps(row, indent=2, default=str))
    else:
        _print_row(row)
    return 0 if row["status"] == "succeeded" else 1


def _follow(store: Store, run_id: int, finished: Callable[[], bool], *, quiet: bool) -> None:
    """Show the run's progress row until ``finished()`` (which may block briefly) says it is over."""
    from tqdm import tqdm

    bar = None if quiet else tqdm(total=0, unit="step", desc=f"run {run_id}", file=sys.stderr, dynamic_ncols=True)
    try:
        while not finished():
            if bar is None:
                continue
            progress = store.runs.get(run_id).get("progress") or {}
            if progress.get("steps") and bar.total != progress["steps"]:
                bar.total = progress["steps"]
            if "step" in progress:
                bar.n = int(progress["step"])
            bar.set_postfix(
                {k: progress[k] for k in ("phase", "epoch", "loss", "samples_per_s") if k in progress}, refresh=False
            )
            bar.refresh()
            time.sleep(0.25)
    finally:
        if bar is not None:
            bar.close()


def _print_row(row: dict[str, object]) -> None:
    print(f"training run {row['id']}: {row['status']}")
    if row.get("error"):
        print(f"  error: {row['error']}")
    if row.get("candidate_version"):
        print(f"  candidate: {row['candidate_version']} (parent {row.get('parent_version') or 'none'})")
        print(f"  data cutoff: {row.get('data_cutoff')}")
    metrics = row.get("metrics") or {}
    for key in _SHOWN:
        if key in metrics:
            print(f"  {key}: {metrics[key]}")
