"""``continual serve``, ``continual status`` and ``continual check-config``."""

from __future__ import annotations

import argparse
import json

from continual.cli.common import open_store, settings_of
from continual.config import config_path, load_settings
from continual.status import collect_status, format_status


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check-config", parents=[common], help="validate a config file")
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--show", action="store_true", help="print the effective settings")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("status", parents=[common], help="counts, champion, runs")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)

    sub.add_parser("serve", parents=[common], help="run the service in the foreground").set_defaults(func=cmd_serve)


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config
    settings = load_settings(path)
    print(f"{config_path(path)}: OK")
    if args.show:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    status = collect_status(settings, open_store(settings))
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # The service (torch, uvicorn, the scheduler) loads only for this command.
    from continual.service.app import serve

    path = config_path(args.config)
    return serve(settings_of(args), str(path.resolve()) if path.is_file() else None)
