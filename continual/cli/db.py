"""``continual db upgrade|current``: the store's schema (Alembic migrations shipped in the package)."""

from __future__ import annotations

import argparse

from continual.cli.common import open_store, settings_of


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    db = sub.add_parser("db", parents=[common], help="store schema").add_subparsers(dest="db_command", metavar="ACTION")
    p = db.add_parser("upgrade", parents=[common], help="apply migrations")
    p.add_argument("revision", nargs="?", default="head")
    p.set_defaults(func=cmd_upgrade)
    db.add_parser("current", parents=[common], help="show the schema revision").set_defaults(func=cmd_current)


def cmd_upgrade(args: argparse.Namespace) -> int:
    store = open_store(settings_of(args), check=False)
    before = store.revision()
    store.upgrade(args.revision)
    after = store.revision()
    print(f"store schema: {before or 'empty'} -> {after}" if before != after else f"store schema already at {after}")
    return 0


def cmd_current(args: argparse.Namespace) -> int:
    store = open_store(settings_of(args), check=False)
    current, head = store.revision(), store.head()
    print(f"current: {current or 'empty'}  head: {head}  {'(up to date)' if current == head else '(needs upgrade)'}")
    return 0 if current == head else 1
