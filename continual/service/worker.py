"""The training worker process: ``python -m continual.service.worker --run RUN_ID [--config PATH]``.

Runs one training run in its own process (never in the service): the composition
root of that process — store, registry, signals, the orphan watch, torchrun's
process group — around :func:`continual.learn.run.execute_run`. ``--config`` gives
only the store connection (and its secrets); what to train comes from the run's
spec. Exit status: 0 succeeded, 1 failed, 143 cancelled (SIGTERM). Under
torchrun every rank runs this module; rank 0 owns the run row and writes the version.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

import torch

from continual.config import Settings, load_settings
from continual.learn.dist import Dist
from continual.learn.orphan import watch_service
from continual.learn.run import execute_run
from continual.registry import Registry
from continual.store import Store

log = logging.getLogger("continual.service.worker")

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 143


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m continual.service.worker", description=__doc__)
    # --run-id: the same; torchrun's own parser refuses "--run" as an ambiguous abbreviation of --run-path.
    parser.add_argument("--run", "--run-id", dest="run", type=int, required=True, metavar="RUN_ID")
    parser.add_argument("--config", default=None, metavar="PATH", help="read [store] from this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        # Only a flag: the loop checks it every step and stops within one step.
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)

    dist = Dist.from_env()
    base = load_settings(args.config, require_file=args.config is not None)
    store = Store.from_settings(base)
    store_settings = base.resolved_store()

    def orphaned() -> None:
        # The service was killed (-9 does not reach this process group): restart recovery
        # would mark the run interrupted; record that now and stop instead of training on.
        if dist.is_main:
            try:
                store.runs.finish(args.run, "interrupted", error="the service that started this run is gone")
            except Exception:
                log.exception("could not mark training run %d interrupted", args.run)
        stop.set()

    def open_files(settings: Settings) -> Registry:
        return Registry(settings.models_dir, store)

    watch_service(orphaned)
    if dist.enabled:
        backend = "nccl" if torch.cuda.is_available() and _training_device(store, args.run) != "cpu" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    try:
        row = execute_run(store, store_settings, args.run, open_files=open_files, stop=stop, dist=dist)
        if dist.enabled:
            # Leave together: rank 0 writes the version while the others are done, and a
            # rank tearing down its gloo pairs under a peer still using them aborts (SIGABRT).
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    finally:
        # On an exception the group is left alone: destroying it under peers still in a
        # collective can hang; torchrun stops the other ranks once this one exits non-zero.
        store.dispose()
    status = row["status"]
    if dist.is_main:
        print(f"training run {args.run}: {status}" + (f" ({row['error']})" if row.get("error") else ""), flush=True)
    code = {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status, EXIT_FAILED)
    if dist.enabled:
        # A rank that has recorded its outcome leaves without interpreter finalization:
        # gloo's C++ threads can still hold Python objects then, and tearing those down
        # aborts the rank (SIGABRT, "terminate called without an active exception"),
        # which torchrun reports as a failed run although it succeeded.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _training_device(store: Store, run_id: int) -> str:
    """The run spec's ``[training] device``: ranks told to use the CPU meet over gloo even on a GPU host."""
    spec = store.runs.get(run_id).get("spec") or {}
    return str(((spec.get("settings") or {}).get("training") or {}).get("device", "auto"))


if __name__ == "__main__":
    sys.exit(main())
