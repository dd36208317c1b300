"""What the service is doing, read from the store: shared by ``GET /v1/status`` and ``continual status``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from continual.config import Settings
from continual.learn.runs import consecutive_failures, failure_backoff
from continual.store import Store
from continual.store.engine import read_tx
from continual.store.schema import champion_history, drift_checks, gate_decisions, model_versions, training_runs


def champion_row(store: Store) -> dict[str, Any] | None:
    """The newest champion-history row joined with its version, or None before the first champion."""
    with read_tx(store.engine) as conn:
        q = (
            select(
                champion_history, model_versions.c.data_cutoff, model_versions.c.metrics, model_versions.c.architecture
            )
            .join(model_versions, model_versions.c.version == champion_history.c.version)
            .order_by(champion_history.c.id.desc())
            .limit(1)
        )
        row = conn.execute(q).first()
        return dict(row._mapping) if row else None


def decision_for_run(store: Store, run_id: int) -> dict[str, Any] | None:
    """The gate's decision on a run's candidate, or None while there is none."""
    with read_tx(store.engine) as conn:
        row = conn.execute(
            select(gate_decisions).where(gate_decisions.c.run_id == run_id).order_by(gate_decisions.c.id.desc())
        ).first()
    return dict(row._mapping) if row else None


def collect_status(settings: Settings, store: Store, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    champion = champion_row(store)
    cutoff = int(champion["data_cutoff"]) if champion else 0
    counts: dict[str, dict[str, int]] = {}
    for (split, label), n in sorted(store.split_label_counts().items()):
        counts.setdefault(label, {"train": 0, "holdout": 0})[split] = n
    with read_tx(store.engine) as conn:
        runs = [
            dict(r._mapping)
            for r in conn.execute(
                select(
                    training_runs.c.id,
                    training_runs.c.trigger,
                    training_runs.c.status,
                    training_runs.c.created_at,
                    training_runs.c.finished_at,
                    training_runs.c.candidate_version,
                    training_runs.c.progress,
                    training_runs.c.error,
                )
                .order_by(training_runs.c.id.desc())
                .limit(5)
            )
        ]
        drift = conn.execute(select(drift_checks).order_by(drift_checks.c.id.desc()).limit(1)).first()
        decision = conn.execute(select(gate_decisions).order_by(gate_decisions.c.id.desc()).limit(1)).first()
    status: dict[str, Any] = {
        "state": "unknown",
        "role": settings.service.role,
        "champion": None
        if champion is None
        else {
            "version": champion["version"],
            "architecture": champion["architecture"],
            "promoted_at": champion["promoted_at"],
            "reason": champion["reason"],
            "actor": champion["actor"],
            "data_cutoff": cutoff,
            "metrics": champion["metrics"],
        },
        "samples": {
            "total": sum(v["train"] + v["holdout"] for v in counts.values()),
            "pending": store.count(after=cutoff),
            "by_label": counts,
        },
        "last_drift_check": dict(drift._mapping) if drift else None,
        "active_run": next((r for r in runs if r["status"] in ("pending", "running")), None),
        "last_runs": runs,
        "last_decision": dict(decision._mapping) if decision else None,
        "training_backoff": _backoff(settings, store),
    }
    status.update(extra or {})
    return status


def _backoff(settings: Settings, store: Store) -> dict[str, Any] | None:
    """Failed runs in a row and how long after the last one the next automatic run waits (None: no failures)."""
    failures = consecutive_failures(store)
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
