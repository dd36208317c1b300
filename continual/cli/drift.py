"""``continual drift check [--json]``: one drift check against the champion, printed per detector.

The check is the service's own (:func:`continual.drift.check.run_check`) and is
recorded like one (a drift_checks row). This process serves no predictions, so
the prediction-shift detector reports itself skipped: predict traffic lives in
the service's memory and shows in its ``continual_drift_*`` metrics instead.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from continual.cli.common import UserError, open_store, settings_of
from continual.drift.check import run_check
from continual.drift.windows import EmbeddingCache
from continual.registry import Registry


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    drift = sub.add_parser("drift", parents=[common], help="drift monitoring").add_subparsers(
        dest="drift_command", metavar="ACTION"
    )
    p = drift.add_parser("check", parents=[common], help="compare new data with the champion's old data now")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.add_argument("--no-record", action="store_true", help="do not write a drift_checks row")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    store = open_store(settings)
    registry = Registry(settings.models_dir, store)
    champion = store.versions.champion_version()
    if champion is None:
        raise UserError("no champion yet: drift is measured against the champion's data (import or train one first)")
    decision = run_check(
        settings, store, registry, champion=champion, cache=EmbeddingCache(), record=not args.no_record
    )
    if args.json:
        print(json.dumps(decision.to_dict(), indent=2, allow_nan=False))
        return 0
    print(format_report(decision.to_dict()))
    return 0


def format_report(d: dict[str, Any]) -> str:  # Any: DriftDecision.to_dict(), JSON values
    """A readable report of ``DriftDecision.to_dict()``: verdict, windows, one block per detector."""
    lines = [
        f"champion {d['champion']}: {'DRIFT DETECTED' if d['detected'] else 'no drift'}",
        f"windows: reference {d['n_reference']} old samples, current {d['n_current']} new samples "
        f"({d['duration_seconds']:.2f} s" + (f", check #{d['check_id']})" if d["check_id"] else ", not recorded)"),
    ]
    if all(r["skipped"] for r in d["detectors"]):  # nothing ran: the reasons say why
        lines += [f"  {r}" for r in d["reasons"]]
        return "\n".join(lines)
    for r in d["detectors"]:
        lines.append("")
        if r["skipped"]:
            lines.append(f"  {r['detector']:18} skipped: {r['skipped']}")
            continue
        det = r["details"]
        lines.append(f"  {r['detector']:18} {'DRIFT' if r['detected'] else 'ok'}")
        lines.append(
            f"    p-value {_num(r['p_value'])} (alpha {_num(det.get('alpha'))})   "
            f"effect {_num(r['effect'])} (min_effect {_num(det.get('min_effect'))})   "
            f"statistic {_num(r['statistic'])}"
        )
        lines.append(f"    n = {r['n_reference']} reference / {r['n_current']} current")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
