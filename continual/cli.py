"""The ``continual`` command. Each subcommand is a small function wired by argparse."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from continual import __version__
from continual.config import ConfigError, Settings, config_path, load_settings


class UserError(Exception):
    """A mistake the user can fix; printed as one line, no traceback."""


Handler = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _store(settings: Settings, *, check: bool = True) -> Any:
    from continual.store import Store

    store = Store.from_settings(settings)
    if check:
        store.check_schema()
    return store


# -- check-config ---------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config
    settings = load_settings(path)
    print(f"{config_path(path)}: OK")
    if args.show:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


# -- db ---------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    store = _store(_settings(args), check=False)
    before = store.revision()
    store.upgrade(args.revision)
    after = store.revision()
    print(f"store schema: {before or 'empty'} -> {after}" if before != after else f"store schema already at {after}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    store = _store(_settings(args), check=False)
    current, head = store.revision(), store.head()
    print(f"current: {current or 'empty'}  head: {head}  {'(up to date)' if current == head else '(needs upgrade)'}")
    return 0 if current == head else 1


# -- status -----------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from continual.status import collect_status, format_status

    settings = _settings(args)
    status = collect_status(settings, _store(settings))
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0


# -- samples ----------------------------------------------------------------------
def cmd_samples_exclude(args: argparse.Namespace) -> int:
    ids = list(args.ids)
    if args.file:
        ids += [line.strip() for line in open(args.file, encoding="utf-8") if line.strip()]  # noqa: SIM115
    if not ids:
        raise UserError("no sample ids given (pass IDs or --file)")
    store = _store(_settings(args))
    changed, unknown = store.exclude(ids)
    store.record_event(
        "samples_excluded",
        f"{changed} samples excluded from the command line: {args.reason}",
        {"ids": ids[:100], "n": changed, "unknown": unknown[:100], "reason": args.reason, "actor": "cli"},
    )
    print(
        f"excluded {changed} samples" + (f"; {len(unknown)} ids unknown: {', '.join(unknown[:10])}" if unknown else "")
    )
    return 0


# -- serve ------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from continual.service import serve

    path = config_path(args.config)
    return serve(_settings(args), str(path.resolve()) if path.is_file() else None)


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

    p = sub.add_parser("check-config", parents=[common], help="validate a config file")
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--show", action="store_true", help="print the effective settings")
    p.set_defaults(func=cmd_check_config)

    db = sub.add_parser("db", parents=[common], help="store schema").add_subparsers(dest="db_command", metavar="ACTION")
    p = db.add_parser("upgrade", parents=[common], help="apply migrations")
    p.add_argument("revision", nargs="?", default="head")
    p.set_defaults(func=cmd_db_upgrade)
    db.add_parser("current", parents=[common], help="show the schema revision").set_defaults(func=cmd_db_current)

    p = sub.add_parser("status", parents=[common], help="counts, champion, runs")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)

    samples = sub.add_parser("samples", parents=[common], help="manage stored feedback").add_subparsers(
        dest="samples_command", metavar="ACTION"
    )
    p = samples.add_parser(
        "exclude", parents=[common], help="take poisoned or mislabeled samples out of training, holdouts and drift"
    )
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--file", help="a file with one sample id per line")
    p.add_argument("--reason", default="", help="recorded in the event log")
    p.set_defaults(func=cmd_samples_exclude)

    sub.add_parser("serve", parents=[common], help="run the service in the foreground").set_defaults(func=cmd_serve)

    for register in _extensions():
        register(sub, common)
    return parser


# Each area's subcommands live beside it: f(subparsers, common_parent) -> None.
_EXTENSION_MODULES = ("continual.cli_ingest", "continual.cli_models", "continual.cli_train", "continual.cli_drift")


def _extensions() -> list[Callable[[Any, argparse.ArgumentParser], None]]:
    import importlib

    found = []
    for name in _EXTENSION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        found.append(module.register)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    from continual.store import IdConflict, SchemaOutOfDate, StoreUnavailable

    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except (ConfigError, UserError, SchemaOutOfDate, StoreUnavailable, IdConflict, FileNotFoundError) as e:
        print(f"continual: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("continual: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Through the importable module: under `python -m continual.cli` this file is also
    # `__main__`, and extensions raising continual.cli.UserError must match what main() catches.
    from continual.cli import main as _main

    sys.exit(_main())
