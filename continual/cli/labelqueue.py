"""``continual label-queue export --k N --format csv|jsonl``: what ``GET /v1/label-queue`` hands out, to a file."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import TextIO

import torch

from continual.cli.common import cli_actor, open_store, settings_of
from continual.learn.labelqueue import BadQueueRequest, items_json, next_items
from continual.registry import Registry

# The CSV's columns; the input (when kept) is one column: "x" as a JSON list, "image" as base64, "text" as is.
COLUMNS = ("prediction_id", "label", "confidence", "margin", "model_version", "predicted_at", "leased_until", "input")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    queue = sub.add_parser(
        "label-queue", parents=[common], help="the unlabeled predictions most worth a label"
    ).add_subparsers(dest="label_queue_command", metavar="ACTION")
    p = queue.add_parser(
        "export",
        parents=[common],
        help="lease up to K items and write them (label them by prediction id: POST /v1/feedback, continual ingest)",
    )
    p.add_argument("--k", type=int, default=100, help="how many items (1..[label_queue] max_k; default 100)")
    p.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    p.add_argument("--output", "-o", default="-", help="file to write (default: standard output)")
    p.add_argument("--no-input", action="store_true", help="leave the inputs out")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if not 1 <= args.k <= settings.label_queue.max_k:
        raise BadQueueRequest("--k", f"must be between 1 and {settings.label_queue.max_k}, got {args.k}")
    store = open_store(settings)
    try:
        champion = store.versions.champion_version()
        model = Registry(settings.models_dir, store).load_model(champion, settings).eval() if champion else None
        spec = settings.model.input
        items = next_items(
            store, settings, model, spec, k=args.k, device=torch.device("cpu"), holder=f"cli:{cli_actor()}"
        )
    finally:
        store.dispose()
    rows = items_json(items, with_input=not args.no_input)
    if args.output == "-":
        _write(sys.stdout, rows, args.format)
    else:
        with Path(args.output).open("w", encoding="utf-8", newline="") as f:
            _write(f, rows, args.format)
    print(f"{len(rows)} items leased for {settings.label_queue.lease_seconds:g} s", file=sys.stderr)
    return 0


def _write(out: TextIO, rows: list[dict[str, object]], fmt: str) -> None:
    if fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r) + "\n")
        return
    w = csv.writer(out)
    w.writerow(COLUMNS)
    for r in rows:
        data = r.get("x", r.get("image", r.get("text")))
        cell = json.dumps(data) if isinstance(data, list) else (data or "")
        w.writerow([*(r[c] for c in COLUMNS[:-1]), cell])
