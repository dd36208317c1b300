"""``continual train --now``: one training run in the foreground, with a progress bar.

The run goes through the same worker process the service uses; this command only
creates the run, follows its progress row and prints the candidate's metrics.
The gate decides about promotion separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from continual.config import config_path, load_settings

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


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="run one training run now, in the foreground")
    p.add_argument("--now", action="store_true", help="train now in a child process and wait for the candidate")
    p.add_argument(
        "--strategy",
        choices=("naive", "replay", "ewc", "replay+ewc"),
        default=None,
        help="override [training] strategy",
    )
    p.add_argument("--seed", type=int, default=None, help="override [training] seed")
    p.add_argument("--json", action="store_true", help="print the finished run as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from continual.cli import UserError
    from continual.learn import runs
    from continual.learn.launch import launch_run
    from continual.store import Store

    if not args.now:
        raise UserError("continual train needs --now (a running service takes POST /v1/train instead)")
    settings = load_settings(args.config)
    if args.strategy:
        settings = settings.model_copy(
            update={"training": settings.training.model_copy(update={"strategy": args.strategy})}
        )
    store = Store.from_settings(settings)
    store.check_schema()
    active = runs.list_runs(store, status="running", limit=1) + runs.list_runs(store, status="pending", limit=1)
    if active:
        raise UserError(f"training run {active[0]['id']} is {active[0]['status']} already; wait for it or cancel it")
    run_id = runs.create_run(store, settings, trigger="cli", seed=args.seed)
    path = config_path(args.config)
    handle = launch_run(settings, store, run_id, path if path.is_file() else None)
    print(f"training run {run_id} started (pid {handle.pid}, log {handle.log_path})", file=sys.stderr)
    try:
        _follow(store, run_id, handle, quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"cancelling training run {run_id} ...", file=sys.stderr)
        handle.cancel()
        return 130
    row = runs.get_run(store, run_id)
    if args.json:
        print(json.dumps(row, indent=2, default=str))
    else:
        _print_row(row)
    return 0 if row["status"] == "succeeded" else 1


def _follow(store: Any, run_id: int, handle: Any, *, quiet: bool) -> None:
    from tqdm import tqdm

    from continual.learn import runs

    bar = None if quiet else tqdm(total=0, unit="step", desc=f"run {run_id}", file=sys.stderr, dynamic_ncols=True)
    try:
        while handle.wait(0.25) is None:
            if bar is None:
                continue
            progress = runs.get_run(store, run_id).get("progress") or {}
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


def _print_row(row: dict[str, Any]) -> None:
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
