"""The accuracy job: windows of the champion's logged predictions with label-free estimates, and what labels say.

Every ``[accuracy] interval_seconds`` (trainer roles, under the trainer lease):

1. close every complete window of ``estimate_window`` consecutive predictions of the
   champion since the last one, with its estimates (``continual.drift.estimate``) and
   flags, in ``store.predictions``;
2. refresh the labeled and correct counts of the newest windows as labels arrive;
3. mirror live accuracy per version, the champion's newest estimates and the newest
   estimation error into the metrics.

Nothing is kept in memory: every tick starts from the store.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from continual.drift.estimate import estimate_window, far_share, unknown_labels_flag, window_flags
from continual.registry import ChecksumMismatch, VersionNotFound
from continual.service.context import ServiceContext
from continual.status import live_accuracy

MAX_WINDOWS_PER_TICK = 50  # a backlog (a restart after a long stop) is caught up over a few ticks
REALIZE_WINDOWS = 50  # the newest windows whose realized accuracy is refreshed every tick


def accuracy(ctx: ServiceContext) -> dict[str, Any]:
    """Close windows of the champion's predictions (estimates), score recent windows and versions by their labels."""
    role = ctx.settings.service.role
    if role == "api" or ctx.stop.is_set():
        return {"skipped": "role api" if role == "api" else "stopping"}
    if not ctx.hold_trainer_lease():
        return {"skipped": "another process holds the trainer lease"}
    champion = ctx.store.versions.champion()
    closed = _close_windows(ctx, champion.version) if champion is not None else []
    windows = _realize(ctx)
    versions = live_accuracy(ctx.settings, ctx.store)
    ctx.metrics.set_live_accuracy([(v.version, v.n, v.accuracy, v.lower, v.upper, v.gate_accuracy) for v in versions])
    mirror_estimates(ctx, champion.version if champion else None, windows)
    return {"closed": closed, "versions": [v.version for v in versions]}


def _calibration(ctx: ServiceContext, version: str) -> dict[str, Any] | None:
    try:
        cal = ctx.registry.manifest(version).extra.get("calibration")
    except (VersionNotFound, ChecksumMismatch, OSError):
        return None
    return cal if isinstance(cal, dict) else None


def _classes(ctx: ServiceContext, version: str) -> tuple[str, ...] | None:
    try:
        return tuple(ctx.registry.manifest(version).classes)
    except (VersionNotFound, ChecksumMismatch, OSError):
        return None


def _drifted(ctx: ServiceContext, version: str) -> list[tuple[str, float]]:
    """Detectors that reported drift in the newest drift check against ``version``, with their effect."""
    row = ctx.store.records.last_drift_check()
    if row is None or row["champion"] != version or not row["detected"]:
        return []
    return [
        (str(d["detector"]), float(d["effect"]))
        for d in (row["results"] or {}).get("detectors", [])
        if d.get("detected") and d.get("effect") is not None
    ]


def _close_windows(ctx: ServiceContext, version: str) -> list[int]:
    """Every complete window of ``estimate_window`` predictions since the last one, with its estimates and flags."""
    size = ctx.settings.accuracy.estimate_window
    last = ctx.store.predictions.last_window(version)
    # Another replica's writer may still hold predictions of the last moments (it flushes every
    # log_flush_seconds): only predictions older than a few of those go into a window.
    settle = max(2.0, 4 * ctx.settings.serving.log_flush_seconds)
    rows = ctx.store.predictions.unwindowed(
        version,
        after_id=last["last_id"] if last else None,
        before=datetime.now(UTC) - timedelta(seconds=settle),
        limit=size * MAX_WINDOWS_PER_TICK,
    )
    if len(rows) < size:
        return []
    calibration = _calibration(ctx, version)
    drifted = _drifted(ctx, version)
    n_classes = len(_classes(ctx, version) or ctx.settings.model.classes)
    closed = []
    for start in range(0, len(rows) - size + 1, size):
        chunk = rows[start : start + size]
        distance = [d for _, _, _, d in chunk]
        closed.append(
            ctx.store.predictions.add_window(
                version=version,
                ids=(chunk[0][0], chunk[-1][0]),
                times=(chunk[0][1], chunk[-1][1]),
                n=len(chunk),
                estimates=estimate_window([c for _, _, c, _ in chunk], calibration, distance, n_classes),
                flags=window_flags(calibration, drifted, far=far_share(distance)),
            )
        )
    return closed


def _realize(ctx: ServiceContext) -> list[dict[str, Any]]:
    """Refresh the labeled and correct counts of the newest windows; returns them, newest first."""
    windows = ctx.store.predictions.windows(limit=REALIZE_WINDOWS)
    outcomes = ctx.store.predictions.window_outcomes(windows)
    classes: dict[str, tuple[str, ...] | None] = {}
    updates = {}
    for w in windows:
        o = outcomes[int(w["id"])]
        if w["model_version"] not in classes:
            classes[w["model_version"]] = _classes(ctx, w["model_version"])
        known = classes[w["model_version"]]
        unknown = sorted(o.true_labels - set(known)) if known is not None else []
        if (o.n_labeled, o.n_correct, unknown) != (w["n_labeled"], w["n_correct"], w["unknown_labels"] or []):
            updates[int(w["id"])] = (o, unknown)
            w.update(n_labeled=o.n_labeled, n_correct=o.n_correct, unknown_labels=unknown or None)
    ctx.store.predictions.set_outcomes(updates)
    return windows


def mirror_estimates(ctx: ServiceContext, champion: str | None, windows: list[dict[str, Any]]) -> None:
    """The champion's newest estimates, the error of the newest window with enough labels, and whether it is flagged."""
    newest = next((w for w in windows if w["model_version"] == champion), None)
    realized = next((w for w in windows if w["n_labeled"] >= ctx.settings.accuracy.min_labels), None)
    errors: dict[str, float | None] = {}
    if realized is not None:
        acc = realized["n_correct"] / realized["n_labeled"]
        errors = {m: (e - acc if e is not None else None) for m, e in realized["estimates"].items()}
    flagged = newest is not None and bool(
        [*(newest["flags"] or []), *unknown_labels_flag(newest["unknown_labels"] or [])]
    )
    ctx.metrics.set_estimates(newest["estimates"] if newest else {}, errors, flagged)
