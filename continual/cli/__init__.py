"""The ``continual`` command: the parser and ``main``. Each area's subcommands live in a module beside this one.

``service`` (serve, status, check-config), ``db``, ``ingest`` (and ``samples exclude``),
``models``, ``train``, ``drift``, ``label-queue``: each has ``register(subparsers, common)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from continual import __version__
from continual.cli import db, drift, ingest, labelqueue, models, service, train
from continual.cli.common import UserError
from continual.config import ConfigError
from continual.learn.labelqueue import BadQueueRequest
from continual.models import ModelError
from continual.registry import ChecksumMismatch
from continual.store import (
    ChampionMoved,
    IdConflict,
    NoPreviousChampion,
    RunActive,
    SchemaOutOfDate,
    StoreUnavailable,
    VersionNotFound,
)

__all__ = ["UserError", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", default=None, help="config file (default: $CONTINUAL_CONFIG, else ./config.toml)"
    )
    parser = argparse.ArgumentParser(
        prog="continual",
        description="Keeps a deployed PyTorch classifier current: ingest labeled feedback, watch drift, "
        "fine-tune without forgetting, gate the candidate, hot-swap it. `continual COMMAND --help` for each command.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"continual {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in (service, db, ingest, models, train, drift, labelqueue):
        area.register(sub, common)
    return parser


# Errors the user can act on: one line, exit 1, no traceback.
USER_ERRORS = (
    ConfigError,
    UserError,
    SchemaOutOfDate,
    StoreUnavailable,
    IdConflict,
    FileNotFoundError,
    ModelError,
    VersionNotFound,
    ChecksumMismatch,
    NoPreviousChampion,
    ChampionMoved,
    RunActive,
    BadQueueRequest,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except USER_ERRORS as e:
        print(f"continual: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("continual: interrupted", file=sys.stderr)
        return 130
