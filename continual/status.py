"""What the service is doing, read from the store: shared by ``GET /v1/status`` and ``continual status``."""

from __future__ import annotations

from typing import Any

from continual.config import Settings
from continual.store import Store
from continual.triggers import failure_backoff

RECENT_RUNS = 5
_RUN_FIELDS = ("id", "trigger", "status", "created_at", "finished_at", "candidate_version", "progress", "error")


def collect_status(settings: Settings, store: Store, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    champion = store.versions.champion()
    cutoff = champion.data_cutoff if champion else 0
    counts: dict[str, dict[str, int]] = {}
    for (split, label), n in sorted(store.split_label_counts().items()):
        counts.setdefault(label, {"train": 0, "holdout": 0})[split] = n
    runs = [{k: r[k] for k in _RUN_FIELDS} for r in store.runs.recent(limit=RECENT_RUNS)]
    status: dict[str, Any] = {
        "state": "unknown",
        "role": settings.service.role,
        "champion": None
        if champion is None
        else {
            "version": champion.version,
            "architecture": champion.architecture,
            "promoted_at": champion.promoted_at,
            "reason": champion.reason,
            "actor": champion.actor,
            "data_cutoff": cutoff,
            "metrics": champion.metrics,
            "classes": list(champion.classes) if champion.classes is not None else None,
        },
        "samples": {
            "total": sum(v["train"] + v["holdout"] for v in counts.values()),
            "pending": store.count(after=cutoff),
            "by_label": counts,
            # Labels with samples that the champion cannot predict (new classes waiting to join it).
            "new_classes": _new_classes(settings, store, champion.classes if champion else None),
        },
        "last_drift_check": store.records.last_drift_check(),
        "active_run": next((r for r in runs if r["status"] in ("pending", "running")), None),
        "last_runs": runs,
        "last_decision": store.records.last_decision(),
        "training_backoff": _backoff(settings, store),
    }
    status.update(extra or {})
    return status


def _new_classes(settings: Settings, store: Store, have: tuple[str, ...] | None) -> list[dict[str, Any]]:
    known = set(have if have is not None else settings.model.classes)
    return [
        {"label": r.label, "first_seen_at": r.first_seen_at, "train": r.train, "holdout": r.holdout}
        for r in store.classes.rows(settings.model.classes)
        if r.label not in known and r.samples
    ]


def _backoff(settings: Settings, store: Store) -> dict[str, Any] | None:
    """Failed runs in a row and how long after the last one the next automatic run waits (None: no failures)."""
    failures = store.runs.consecutive_failures()
    if not failures:
        return None
    return {"consecutive_failures": failures, "retry_wait_seconds": failure_backoff(failures, settings.triggers)}


def format_status(status: dict[str, Any]) -> str:
    lines = [f"state: {status['state']}   role: {status['role']}"]
    champ = status["champion"]
    if champ:
        lines.append(
            f"champion: {champ['version']} ({champ['architecture']}), promoted {champ['promoted_at']} "
            f"by {champ['reason']}{' / ' + champ['actor'] if champ['actor'] else ''}; data cutoff {champ['data_cutoff']}"
        )
        if champ["metrics"]:
            lines.append(f"  metrics: {champ['metrics']}")
    else:
        lines.append("champion: none yet")
    s = status["samples"]
    lines.append(f"samples: {s['total']} stored, {s['pending']} pending (after the champion's cutoff)")
    if s["by_label"]:
        lines.append(f"  {'label':<20} {'train':>8} {'holdout':>8}")
        for label, c in s["by_label"].items():
            lines.append(f"  {label:<20} {c['train']:>8} {c['holdout']:>8}")
    for c in s.get("new_classes") or []:
        lines.append(
            f"  new class {c['label']!r}: {c['train']} train, {c['holdout']} holdout, first seen {c['first_seen_at']}"
        )
    d = status["last_drift_check"]
    lines.append(
        f"last drift check: {d['created_at']} detected={d['detected']} (ref {d['n_reference']}, cur {d['n_current']})"
        if d
        else "last drift check: none"
    )
    if status["active_run"]:
        r = status["active_run"]
        lines.append(f"active run: #{r['id']} ({r['trigger']}) {r['status']} progress={r['progress']}")
    for r in status["last_runs"]:
        lines.append(
            f"  run #{r['id']}: {r['status']:<11} trigger={r['trigger']} candidate={r['candidate_version']}"
            + (f" error={r['error']}" if r["error"] else "")
        )
    backoff = status.get("training_backoff")
    if backoff:
        lines.append(
            f"training backoff: {backoff['consecutive_failures']} failed runs in a row; the next automatic run "
            f"waits {backoff['retry_wait_seconds']:g} s after the last one (a manual run does not wait)"
        )
    dec = status["last_decision"]
    if dec:
        lines.append(f"last decision: {dec['outcome']} {dec['candidate']} (rule {dec['rule']}): {dec['reasons']}")
    return "\n".join(lines)
