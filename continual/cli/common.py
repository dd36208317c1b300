"""What every subcommand shares: the one-line user error, loading the settings, opening the store."""

from __future__ import annotations

import argparse
import getpass
import time
from collections.abc import Callable
from typing import TypeVar

from continual.config import Settings, load_settings
from continual.store import Store

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix; printed as one line, no traceback."""


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def open_store(settings: Settings, *, check: bool = True) -> Store:
    """The configured store; with ``check``, refuse a schema that is not current (saying what to run)."""
    store = Store.from_settings(settings)
    if check:
        store.check_schema()
    return store


def cli_actor() -> str:
    """Who acted, for the audit trail: the local user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def poll(value: Callable[[], T | None], seconds: float, interval: float = 0.25) -> T | None:
    """``value()`` once it is truthy, polling for up to ``seconds``; None if it never is."""
    deadline = time.monotonic() + seconds
    while not (got := value()):
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)
    return got
