"""``continual models list|promote|rollback|import|prune``."""

from __future__ import annotations

import argparse
import json

from continual.cli.common import UserError, cli_actor, open_store, settings_of
from continual.config import Settings
from continual.models import build_model
from continual.registry import Registry


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    models = sub.add_parser("models", parents=[common], help="model versions and the champion").add_subparsers(
        dest="models_command", metavar="ACTION"
    )
    p = models.add_parser("list", parents=[common], help="versions, statuses and the champion history")
    p.add_argument("--json", action="store_true", help="print the versions and the history as JSON")
    p.set_defaults(func=cmd_list)

    p = models.add_parser("promote", parents=[common], help="make a version champion (recorded as manual)")
    p.add_argument("version")
    p.set_defaults(func=cmd_promote)

    p = models.add_parser("rollback", parents=[common], help="the previous champion becomes champion again")
    p.set_defaults(func=cmd_rollback)

    p = models.add_parser(
        "import", parents=[common], help="register weights for the configured architecture and make them champion"
    )
    p.add_argument("path", help=".safetensors, or a state dict saved with torch.save (read with weights_only=True)")
    p.add_argument(
        "--data-cutoff", type=int, default=0, help="last sample seq the model has seen (default 0: none of the store)"
    )
    p.add_argument("--no-promote", action="store_true", help="register only; do not make it champion")
    p.set_defaults(func=cmd_import)

    p = models.add_parser("prune", parents=[common], help="apply retention: newest N versions plus every champion")
    p.add_argument("--keep", type=int, default=None, help="default: [model] keep_versions")
    p.set_defaults(func=cmd_prune)


def _registry(args: argparse.Namespace) -> tuple[Settings, Registry]:
    settings = settings_of(args)
    return settings, Registry(settings.models_dir, open_store(settings))


def cmd_list(args: argparse.Namespace) -> int:
    _, reg = _registry(args)
    v = reg.store.versions
    versions, history, champion = v.rows(), v.history(), v.champion_version()
    if args.json:
        print(json.dumps({"champion": champion, "versions": versions, "history": history}, indent=2, default=str))
        return 0
    if not versions:
        print("no model versions yet (continual models import PATH registers one)")
        return 0
    print(f"{'':2}{'version':30} {'status':10} {'architecture':20} {'cutoff':>8}  parent")
    for v in reversed(versions):
        mark = "* " if v["version"] == champion else "  "
        print(
            f"{mark}{v['version']:30} {v['status']:10} {v['architecture'][:20]:20} {v['data_cutoff']:>8}  "
            f"{v['parent'] or '-'}"
        )
    print("\nchampion history (newest first):")
    for h in history[:20]:
        by = f" by {h['actor']}" if h["actor"] else ""
        print(f"  {h['promoted_at']:%Y-%m-%d %H:%M:%S}  {h['version']}  {h['reason']}{by}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    _, reg = _registry(args)
    before = reg.store.versions.champion_version()
    reg.promote(args.version, expected=before, reason="manual", actor=cli_actor())
    print(f"champion: {before or 'none'} -> {args.version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    _, reg = _registry(args)
    before, target = reg.rollback(actor=cli_actor())
    print(f"rolled back: {before} -> {target}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    settings, reg = _registry(args)
    # Building with the file checks that it fits the configured architecture and classes.
    model = build_model(settings.model, weights=args.path)
    manifest = reg.import_model(
        model,
        input_spec=settings.model.input.model_dump(mode="json"),
        data_cutoff=args.data_cutoff,
        promote=not args.no_promote,
        actor=cli_actor(),
        extra={"imported_from": str(args.path)},
    )
    print(f"registered {manifest.version} ({manifest.architecture}, {len(manifest.classes)} classes)")
    if not args.no_promote:
        print(f"champion: {manifest.version}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    settings, reg = _registry(args)
    keep = args.keep if args.keep is not None else settings.model.keep_versions
    if keep < 1:
        raise UserError(f"--keep must be >= 1, got {keep}")
    deleted = reg.apply_retention(keep)
    print(f"deleted {len(deleted)} version(s)" + (": " + ", ".join(deleted) if deleted else ""))
    return 0
