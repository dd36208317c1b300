"""``continual ingest PATH`` (send a directory tree, .npz, CSV or JSON Lines to a running service) and ``continual samples exclude``.

Resumable: ids are derived from each file/row and its content, so a second run
sends the same ids and the server answers "duplicate" for what it already has.
A batch refused for some of its samples (422/409/413 naming them) is resent
without them, and those are reported with their reasons.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from continual.cli.common import UserError, open_store, settings_of
from continual.client import Client, ClientError
from continual.config import load_settings
from continual.ingest import ExclusionInvalid, exclusion_request
from continual.ingest.importers import ImportFormatError, Item, Skipped, open_source

# Server error codes whose details name the samples at fault: drop those, resend the rest.
_PER_SAMPLE_CODES = frozenset(
    {"validation_failed", "id_conflict", "payload_too_large", "unknown_prediction", "input_not_logged"}
)
# Refusals of a batch's size: halve it and send both halves.
_TOO_BIG_CODES = frozenset({"too_many_samples", "body_too_large", "decoded_too_large"})


@dataclass
class ImportReport:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)

    @property
    def done(self) -> int:
        return self.accepted + self.duplicates + len(self.rejected)


def send_all(
    items: Iterable[Item | Skipped],
    client: Client,
    *,
    batch_size: int = 100,
    on_progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Send items in batches; returns the counts. Errors that are not about single samples are raised."""
    report = ImportReport()
    batch: list[Item] = []

    def flush() -> None:
        if batch:
            _send_batch(batch, client, report)
            if on_progress:
                on_progress(len(batch))
            batch.clear()

    for it in items:
        if isinstance(it, Skipped):
            report.rejected.append((it.where, it.reason))
            if on_progress:
                on_progress(1)
            continue
        batch.append(it)
        if len(batch) >= batch_size:
            flush()
    flush()
    return report


def _send_batch(batch: list[Item], client: Client, report: ImportReport) -> None:
    pending = list(batch)
    while pending:
        try:
            result = client.send_batch([it.sample for it in pending])
        except ClientError as e:
            if e.code in _TOO_BIG_CODES:
                if len(pending) == 1:
                    report.rejected.append((pending[0].where, e.message))
                    return
                # The server's limits are smaller than our batch: halve and go on.
                half = len(pending) // 2
                _send_batch(pending[:half], client, report)
                _send_batch(pending[half:], client, report)
                return
            bad = _blamed(e, len(pending))
            if not bad:
                raise
            for i in sorted(bad):
                report.rejected.append((pending[i].where, "; ".join(bad[i])))
            pending = [it for i, it in enumerate(pending) if i not in bad]
            continue
        report.accepted += result.accepted
        report.duplicates += result.duplicates
        return


def _blamed(e: ClientError, n: int) -> dict[int, list[str]]:
    if e.code not in _PER_SAMPLE_CODES:
        return {}
    bad: dict[int, list[str]] = {}
    for d in e.details:
        i = d.get("index") if isinstance(d, dict) else None
        if not isinstance(i, int) or not 0 <= i < n:
            return {}  # a whole-request problem: do not guess
        field_name = d.get("field") or ""
        bad.setdefault(i, []).append(f"{field_name}: {d.get('message', e.message)}" if field_name else e.message)
    return bad


def format_report(report: ImportReport, *, max_reasons: int = 20) -> str:
    lines = [f"accepted {report.accepted}, duplicates {report.duplicates}, rejected {len(report.rejected)}"]
    if report.rejected:
        by_reason = Counter(reason for _, reason in report.rejected)
        lines.append("rejected by reason:")
        lines += [f"  {n:>6}  {reason}" for reason, n in by_reason.most_common(max_reasons)]
        lines.append("rejected samples:")
        lines += [f"  {where}: {reason}" for where, reason in report.rejected[:max_reasons]]
        if len(report.rejected) > max_reasons:
            lines.append(f"  ... and {len(report.rejected) - max_reasons} more")
    return "\n".join(lines)


def default_url(args: argparse.Namespace) -> str:
    if os.environ.get("CONTINUAL_URL"):
        return os.environ["CONTINUAL_URL"]
    s = load_settings(args.config, require_file=False).service
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    return f"http://{host}:{s.port}"


def ingest_token(args: argparse.Namespace) -> str | None:
    """``--token-file``, else ``$CONTINUAL_TOKEN``, else ``--token`` (which other users can read in ``ps``)."""
    if args.token is not None and args.token_file is not None:
        raise UserError("pass --token or --token-file, not both")
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise UserError(f"--token-file {args.token_file}: {e.strerror or e}") from None
        if not token:
            raise UserError(f"--token-file {args.token_file}: the first line is empty")
        return token
    if args.token is not None:
        print(
            "continual: warning: --token shows in `ps` and in shell history; "
            "use $CONTINUAL_TOKEN or --token-file instead",
            file=sys.stderr,
        )
        return str(args.token)
    return os.environ.get("CONTINUAL_TOKEN")


def cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        source = open_source(args.path, images=args.images)
    except ImportFormatError as e:
        raise UserError(str(e)) from None
    url = args.url or default_url(args)
    token = ingest_token(args)
    with (
        Client(url, token, retries=args.retries, timeout=args.timeout) as client,
        tqdm(total=source.total, unit="sample", disable=args.quiet, file=sys.stderr) as bar,
    ):
        try:
            report = send_all(source.items, client, batch_size=args.batch_size, on_progress=bar.update)
        except ClientError as e:
            bar.close()
            details = f" {e.details[:3]}" if e.details else ""
            raise UserError(f"{url}: {e}{details} (samples sent before this are stored; run again to resume)") from None
    print(format_report(report))
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "ingest",
        parents=[common],
        help="send labeled samples from a directory tree, .npz, .csv or .jsonl to a running service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path",
        help="PATH/<class>/<file>.png|jpg, a .npz with x and y, a .csv with a label column (and features, image or text), or a .jsonl of {text, label, id}",
    )
    p.add_argument("--url", default=None, help="service URL (default: $CONTINUAL_URL, else host:port from the config)")
    p.add_argument(
        "--token", default=None, help="ingest token; shows in `ps` and shell history: prefer $CONTINUAL_TOKEN"
    )
    p.add_argument("--token-file", default=None, metavar="PATH", help="read the ingest token from this file")
    p.add_argument("--batch-size", type=int, default=100, help="samples per request (default: 100)")
    p.add_argument("--images", action="store_true", help=".npz only: send x rows as PNG images, not vectors")
    p.add_argument("--retries", type=int, default=5, help="retries per batch on 503/connection errors")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

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


def cmd_samples_exclude(args: argparse.Namespace) -> int:
    ids = list(args.ids)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            ids += [line.strip() for line in f if line.strip()]
    if not ids:
        raise UserError("no sample ids given (pass IDs or --file)")
    try:
        # The HTTP route's rules (ids as feedback ids, a storable reason), without its count limit.
        req = exclusion_request({"ids": ids, "reason": args.reason}, max_ids=None)
    except ExclusionInvalid as e:
        shown = "; ".join(
            (f"id {ids[d['index']]!r}" if d["index"] is not None else d["field"]) + f": {d['message']}"
            for d in e.details[:5]
        )
        raise UserError(f"nothing excluded: {shown}" + (" ..." if len(e.details) > 5 else "")) from None
    store = open_store(settings_of(args))
    changed, unknown = store.exclude(req.ids, reason=req.reason, actor="cli")
    print(
        f"excluded {changed} samples" + (f"; {len(unknown)} ids unknown: {', '.join(unknown[:10])}" if unknown else "")
    )
    return 0
