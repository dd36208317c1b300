"""The gate for a candidate that adds classes: per-class recall, not just averages.

A pure rule over per-sample predictions (class names) on one holdout, for the
candidate and the champion. Averages hide one class collapsing — a grown head
can take most of one old class's samples for the new class while the old-class
accuracy barely moves — so besides the old-class accuracy every old class's
recall is compared with the champion's. To be merged into ``gate.py``; it
returns the same :class:`~continual.gate.Decision`, so recording is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from continual.gate import Decision

# The order in which rules decide: the first that fails names the decision.
RULES = ("min_class_holdout", "max_old_forgetting", "min_new_class_recall", "max_class_recall_drop")
# Recalls are ratios of counts: compare with a tolerance so a value exactly at a
# threshold never fails through float rounding (1.0 - 0.9 is 0.09999999999999998).
_EPS = 1e-9


@dataclass(frozen=True)
class ClassGate:
    """The thresholds (their defaults will live in ``GateSettings``).

    ``max_old_forgetting``: candidate's old-class accuracy may be at most this
    much below the champion's. ``min_new_class_recall``: each new class's
    recall on its holdout. ``max_class_recall_drop``: no old class's recall may
    fall more than this below the champion's. ``min_class_holdout``: a new class
    with fewer holdout samples defers the decision; an old class with fewer is
    left out of the per-class check (one sample would swing its recall by
    1/n) but still counts in the old-class accuracy.
    """

    max_old_forgetting: float
    min_new_class_recall: float
    max_class_recall_drop: float
    min_class_holdout: int

    def __post_init__(self) -> None:
        for name in ("max_old_forgetting", "min_new_class_recall", "max_class_recall_drop"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.min_class_holdout < 1:
            raise ValueError(f"min_class_holdout must be >= 1, got {self.min_class_holdout!r}")


def decide_classes(
    labels: Sequence[str],
    candidate: Sequence[str],
    champion: Sequence[str],
    parent_classes: Sequence[str],
    new_classes: Sequence[str],
    rule: ClassGate,
) -> Decision:
    """Promote, reject or defer a candidate that adds ``new_classes`` to ``parent_classes``.

    ``labels``, ``candidate``, ``champion``: the true class and each model's
    predicted class for the same holdout samples, in the same order. Every rule
    is evaluated and every failure is listed in ``reasons``; ``rule`` names the
    first failure in :data:`RULES` order. ``metrics`` holds every number, JSON-able.

    >>> gate = ClassGate(0.02, 0.5, 0.1, min_class_holdout=2)
    >>> d = decide_classes(["a", "a", "b", "b", "c", "c"], ["a", "a", "b", "b", "c", "a"],
    ...                    ["a", "a", "b", "b", "a", "a"], ["a", "b"], ["c"], gate)
    >>> d.outcome, d.rule, d.metrics["candidate_recall"]["c"]
    ('promoted', 'all_rules_passed', 0.5)
    """
    y, cand, champ = (np.asarray(list(v), dtype=object) for v in (labels, candidate, champion))
    if not (len(y) == len(cand) == len(champ)):
        raise ValueError(
            f"labels, candidate and champion must have one entry per holdout sample: "
            f"got {len(y)}, {len(cand)} and {len(champ)}"
        )
    old, new = tuple(parent_classes), tuple(new_classes)
    if not new:
        raise ValueError("new_classes is empty: use the ordinary gate for a candidate without new classes")
    if set(old) & set(new):
        raise ValueError(f"new_classes {sorted(set(old) & set(new))} are already among parent_classes")
    unknown = sorted(set(y.tolist()) - set(old) - set(new))
    if unknown:
        raise ValueError(f"holdout labels {unknown[:8]} are in neither parent_classes nor new_classes")

    counts = {c: int(np.sum(y == c)) for c in (*old, *new)}
    cand_recall = {c: _recall(y, cand, c) for c in (*old, *new)}
    champ_recall = {c: _recall(y, champ, c) for c in (*old, *new)}
    is_old = np.isin(y, list(old))
    n_old = int(is_old.sum())
    cand_old = float(np.mean(cand[is_old] == y[is_old])) if n_old else None
    champ_old = float(np.mean(champ[is_old] == y[is_old])) if n_old else None
    checked = [c for c in old if counts[c] >= rule.min_class_holdout]
    drops = {c: _drop(champ_recall[c], cand_recall[c]) for c in old if counts[c]}
    metrics: dict[str, Any] = {
        "parent_classes": list(old),
        "new_classes": list(new),
        "n_holdout": len(y),
        "n_old": n_old,
        "class_holdout": counts,
        "candidate_old_accuracy": cand_old,
        "champion_old_accuracy": champ_old,
        "candidate_accuracy": float(np.mean(cand == y)) if len(y) else None,
        "candidate_recall": cand_recall,
        "champion_recall": champ_recall,
        "recall_drop": drops,
        "unchecked_old_classes": [c for c in old if c not in checked],
        "max_old_forgetting": rule.max_old_forgetting,
        "min_new_class_recall": rule.min_new_class_recall,
        "max_class_recall_drop": rule.max_class_recall_drop,
        "min_class_holdout": rule.min_class_holdout,
    }

    thin = [c for c in new if counts[c] < rule.min_class_holdout]
    if thin or n_old == 0:
        reasons = [f"new class {c!r} has {counts[c]} holdout samples, needs {rule.min_class_holdout}" for c in thin]
        if n_old == 0:
            reasons.append("the holdout has no samples of the parent's classes: forgetting cannot be measured")
        return Decision("deferred", "min_class_holdout", reasons, metrics)

    failed: dict[str, list[str]] = {r: [] for r in RULES}
    passed: list[str] = []
    acc, acc_champ = float(cand_old or 0.0), float(champ_old or 0.0)  # not None: n_old > 0
    line = f"old-class accuracy {acc:.4f} vs champion's {acc_champ:.4f} − {rule.max_old_forgetting}"
    if acc + _EPS < acc_champ - rule.max_old_forgetting:
        failed["max_old_forgetting"].append(line.replace(" vs ", " < "))
    else:
        passed.append(line.replace(" vs ", " >= "))
    for c in new:
        r = float(cand_recall[c] or 0.0)  # not None: the class has holdout samples
        line = f"new class {c!r} recall {r:.4f} vs min_new_class_recall {rule.min_new_class_recall}"
        if r + _EPS < rule.min_new_class_recall:
            failed["min_new_class_recall"].append(line.replace(" vs ", " < "))
        else:
            passed.append(line.replace(" vs ", " >= "))
    for c in checked:
        line = (
            f"old class {c!r} recall {cand_recall[c] or 0.0:.4f}, champion's {champ_recall[c] or 0.0:.4f}: "
            f"drop {drops[c]:.4f} vs max_class_recall_drop {rule.max_class_recall_drop}"
        )
        if drops[c] > rule.max_class_recall_drop + _EPS:
            failed["max_class_recall_drop"].append(line.replace(" vs ", " > "))
        else:
            passed.append(line.replace(" vs ", " <= "))
    if metrics["unchecked_old_classes"]:
        passed.append(
            f"old classes {metrics['unchecked_old_classes']} have fewer than {rule.min_class_holdout} holdout "
            "samples: left out of the per-class check (still in the old-class accuracy)"
        )
    first = next((r for r in RULES if failed[r]), None)
    if first is None:
        return Decision("promoted", "all_rules_passed", passed, metrics)
    # The failures first (what an operator needs), then what passed.
    return Decision("rejected", first, [*(line for r in RULES for line in failed[r]), *passed], metrics)


def _drop(champion: float | None, candidate: float | None) -> float:
    return (champion or 0.0) - (candidate or 0.0)


def _recall(y: np.ndarray, pred: np.ndarray, c: str) -> float | None:
    of_c = y == c
    return float(np.mean(pred[of_c] == c)) if of_c.any() else None
