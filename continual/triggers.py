"""When a training run starts: pure rules over what the store says, and the backoff after failures.

The service's check job (``continual.service.jobs.check``) gathers a
:class:`TriggerInput` from the store every tick and calls :func:`trigger_reason`;
nothing here does I/O, so every rule is tested with plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from continual.config import TriggerSettings
from continual.learn.classes import is_ready

# Backoff: a run that keeps failing (a sample that crashes decoding, a device that
# runs out of memory) is retried after cooldown, then 2x, 4x, ... of it, never
# more than max_interval_seconds apart: a broken trainer does not spin.
_MAX_DOUBLINGS = 30


@dataclass(frozen=True)
class TriggerInput:
    has_champion: bool
    pending: int
    seconds_since_last_run: float | None
    drift_detected: bool
    requested: bool = False
    # False when the last gated run already saw every sample there is: retraining on
    # the same data would only rebuild the same candidate.
    new_since_last_run: bool = True
    # Runs failed in a row since the last success: the wait before the next one doubles.
    consecutive_failures: int = 0
    # The label-free accuracy estimate of the champion's newest window of predictions (None: none yet).
    estimated_accuracy: float | None = None
    # Classes the champion lacks that the label policy lets in: (label, train samples, holdout samples),
    # in joining order (``continual.learn.classes.new_class_counts``).
    new_classes: tuple[tuple[str, int, int], ...] = ()


def ready_classes(t: TriggerInput, trig: TriggerSettings) -> list[tuple[str, int, int]]:
    """The new classes with ``min_class_samples`` train and ``min_class_holdout`` holdout samples."""
    return [c for c in t.new_classes if is_ready(c[1], c[2], trig)]


def trigger_reason(t: TriggerInput, trig: TriggerSettings) -> str | None:
    """Why a run should start now, or None. A manual request skips the thresholds (still gated).

    A new class that is ready (``min_class_samples`` train and ``min_class_holdout``
    holdout samples) starts a run by itself, before the sample-count rules.

    The cooldown (longer after failures, see :func:`failure_backoff`) and the
    "nothing new since the last gated run" rule hold for the bootstrap run too: a
    first candidate rejected by ``min_accuracy`` is not rebuilt from the same data
    every tick.
    """
    if t.requested:
        return "manual"
    wait = failure_backoff(t.consecutive_failures, trig)
    if t.seconds_since_last_run is not None and t.seconds_since_last_run < wait:
        return None
    if not t.new_since_last_run:
        return None
    after = f" (after {t.consecutive_failures} failed runs in a row)" if t.consecutive_failures else ""
    ready = ready_classes(t, trig) if t.has_champion else []
    if ready:
        # A class the model lacks is worth a run however few other samples arrived.
        label, n_train, n_holdout = ready[0]
        more = f" (and {len(ready) - 1} more new classes)" if len(ready) > 1 else ""
        return (
            f"new class {label!r} has {n_train + n_holdout} samples ({n_train} train, {n_holdout} holdout){more}{after}"
        )
    if t.pending < trig.min_new_samples:
        return None
    if not t.has_champion:
        return f"bootstrap: {t.pending} samples >= min_new_samples {trig.min_new_samples}{after}"
    if estimate_low(t.estimated_accuracy, trig):
        return (
            f"estimated accuracy {t.estimated_accuracy:.3f} < min_estimated_accuracy {trig.min_estimated_accuracy:g} "
            f"with {t.pending} new samples{after}"
        )
    if t.drift_detected:
        return f"drift detected with {t.pending} new samples{after}"
    if t.pending >= trig.max_new_samples:
        return f"{t.pending} new samples >= max_new_samples {trig.max_new_samples}{after}"
    if t.seconds_since_last_run is None or t.seconds_since_last_run >= trig.max_interval_seconds:
        return f"{t.pending} new samples and max_interval_seconds {trig.max_interval_seconds:g} passed{after}"
    return None


def estimate_low(estimated: float | None, trig: TriggerSettings) -> bool:
    """Whether the accuracy estimate is below ``min_estimated_accuracy`` (never, when that is 0: off)."""
    return trig.min_estimated_accuracy > 0 and estimated is not None and estimated < trig.min_estimated_accuracy


def labels_needed(t: TriggerInput, trig: TriggerSettings) -> int:
    """How many more labeled samples the run a low estimate asks for needs (0: none asked for, or enough)."""
    if not t.has_champion or not estimate_low(t.estimated_accuracy, trig):
        return 0
    return max(0, trig.min_new_samples - t.pending)


def pick_estimate(estimates: Mapping[str, float | None] | None, estimator: str) -> float | None:
    """The configured estimator's value; the mean confidence when that one has none (no calibration)."""
    if not estimates:
        return None
    value = estimates.get(estimator)
    return value if value is not None else estimates.get("confidence")


def failure_backoff(failures: int, triggers: TriggerSettings) -> float:
    """Seconds to wait after the last run before the next automatic one, given the failures in a row.

    No failure: the configured cooldown. After k >= 1 failures: ``base * 2**(k-1)`` with
    ``base = max(cooldown, check interval)`` (a zero cooldown still backs off), capped at
    ``max(max_interval_seconds, cooldown)``.
    """
    if failures <= 0:
        return triggers.cooldown_seconds
    base = max(triggers.cooldown_seconds, triggers.check_interval_seconds)
    cap = max(triggers.max_interval_seconds, triggers.cooldown_seconds)
    return min(base * 2.0 ** min(failures - 1, _MAX_DOUBLINGS), cap)
