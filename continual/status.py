"""What the service is doing, read from the store: shared by ``GET /v1/status`` and ``continual status``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from continual.config import Settings
from continual.drift.estimate import unknown_labels_flag, wilson_interval
from continual.store import Store
from continual.triggers import TriggerInput, failure_backoff, labels_needed, pick_estimate

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
        "accuracy": accuracy_status(settings, store, champion.version if champion else None, store.count(after=cutoff)),
        "label_queue": {
            "strategy": settings.label_queue.strategy,
            "leased": store.label_queue.active(now=store.label_queue.clock()),
        },
    }
    status.update(extra or {})
    return status


# -- live and estimated accuracy ------------------------------------------------------------------
@dataclass(frozen=True)
class VersionAccuracy:
    """Live accuracy of one version (its last ``live_window`` labeled predictions) beside the gate's."""

    version: str
    champion: bool
    n: int
    correct: int
    accuracy: float | None
    lower: float | None  # Wilson 95%
    upper: float | None
    gate_accuracy: float | None  # holdout accuracy the gate measured, old and new holdouts together
    gate_n: int | None


def gate_accuracy(metrics: Mapping[str, Any] | None) -> tuple[float, int] | None:
    """(accuracy, n) on the gate's holdouts from a version's recorded metrics; None when it was never gated."""
    m = metrics or {}
    n_old, n_new = int(m.get("n_old") or 0), int(m.get("n_new") or 0)
    if m.get("candidate_accuracy") is not None:  # bootstrap: one holdout
        return float(m["candidate_accuracy"]), n_old + n_new
    parts = [(m.get("candidate_old_accuracy"), n_old), (m.get("candidate_new_accuracy"), n_new)]
    known = [(float(a), n) for a, n in parts if a is not None and n > 0]
    total = sum(n for _, n in known)
    if not total:
        return None
    return sum(a * n for a, n in known) / total, total


def recent_versions(store: Store, k: int) -> list[str]:
    """The champion and the champions before it, newest first, at most ``k`` (a bounded metric label set)."""
    out: list[str] = []
    for row in store.versions.history(limit=max(4 * k, 16)):
        if row["version"] not in out:
            out.append(row["version"])
        if len(out) >= k:
            break
    return out


def live_accuracy(settings: Settings, store: Store) -> list[VersionAccuracy]:
    versions = recent_versions(store, settings.accuracy.live_versions)
    outcomes = store.predictions.outcomes_by_version(versions, last=settings.accuracy.live_window)
    out = []
    for i, v in enumerate(versions):
        o = outcomes[v]
        lower, upper = wilson_interval(o.n_correct, o.n_labeled) if o.n_labeled else (None, None)
        row = store.versions.get(v)
        gate = gate_accuracy(row["metrics"] if row else None)
        out.append(
            VersionAccuracy(
                version=v,
                champion=i == 0,
                n=o.n_labeled,
                correct=o.n_correct,
                accuracy=o.n_correct / o.n_labeled if o.n_labeled else None,
                lower=lower,
                upper=upper,
                gate_accuracy=gate[0] if gate else None,
                gate_n=gate[1] if gate else None,
            )
        )
    return out


def window_summary(w: Mapping[str, Any]) -> dict[str, Any]:
    """A window row as status shows it: estimates, and what the labels say so far."""
    n_labeled, n_correct = int(w["n_labeled"]), int(w["n_correct"])
    realized = n_correct / n_labeled if n_labeled else None
    return {
        "id": w["id"],
        "model_version": w["model_version"],
        "n": w["n"],
        "first_at": w["first_at"],
        "last_at": w["last_at"],
        "estimates": w["estimates"],
        "flags": [*(w["flags"] or []), *unknown_labels_flag(w["unknown_labels"] or [])],
        "n_labeled": n_labeled,
        "realized": realized,
        "errors": {
            m: (e - realized if e is not None and realized is not None else None)
            for m, e in (w["estimates"] or {}).items()
        },
    }


def accuracy_status(settings: Settings, store: Store, champion: str | None, pending: int) -> dict[str, Any]:
    window = store.predictions.last_window(champion) if champion else None
    estimate = pick_estimate(window["estimates"], settings.accuracy.estimator) if window else None
    needed = labels_needed(
        TriggerInput(champion is not None, pending, None, False, estimated_accuracy=estimate), settings.triggers
    )
    return {
        "live_window": settings.accuracy.live_window,
        "versions": [asdict(v) for v in live_accuracy(settings, store)],
        "estimator": settings.accuracy.estimator,
        "estimate": estimate,
        "last_window": window_summary(window) if window else None,
        "labels_needed": needed,
    }


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
    queue = status.get("label_queue")
    if queue:
        lines.append(f"label queue ({queue['strategy']}): {queue['leased']} items leased to labelers now")
    if status.get("accuracy"):
        lines.extend(format_accuracy(status["accuracy"]))
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def format_accuracy(acc: dict[str, Any]) -> list[str]:
    lines = [f"live accuracy (last {acc['live_window']} labeled predictions per version, Wilson 95%) vs the gate:"]
    if not acc["versions"]:
        lines.append("  no champion yet")
    for v in acc["versions"]:
        interval = f"[{v['lower']:.3f}, {v['upper']:.3f}]" if v["n"] else "[  -  ,   -  ]"
        gate = f"gate {_pct(v['gate_accuracy'])} (holdout n={v['gate_n']})" if v["gate_accuracy"] is not None else ""
        role = "champion" if v["champion"] else "earlier "
        lines.append(f"  {v['version']}  {role}  live {_pct(v['accuracy'])} {interval} n={v['n']:<5} {gate}")
    w = acc["last_window"]
    if w is None:
        lines.append("estimated accuracy: no window of predictions yet")
    else:
        est = ", ".join(f"{m} {_pct(e).strip()}" for m, e in sorted(w["estimates"].items()))
        real = (
            f"realized {w['realized']:.3f} from {w['n_labeled']} labels"
            if w["realized"] is not None
            else "no labels yet"
        )
        lines.append(f"estimated accuracy (window #{w['id']}, {w['n']} predictions): {est}; {real}")
        lines.extend(f"  flag: {f}" for f in w["flags"])
    if acc["labels_needed"]:
        lines.append(
            f"labels needed: {acc['labels_needed']} more labeled samples for the run the low estimate asks for"
        )
    return lines
