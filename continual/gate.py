"""The promotion gate: candidate vs champion on the same old and new holdout samples.

The rules are pure functions: :func:`decide` of per-sample correctness, and
:func:`decide_classes` of per-sample predicted classes for a candidate that adds
classes. The shell (:func:`evaluate`) draws the holdouts, runs both models on
them and decides.
Promoting, recording and metrics belong to the caller (``continual.service.trainer``).

One piece by design (about 450 lines): every rule that can refuse a candidate is
here, so a reader checking why a model was or was not promoted reads one file;
the per-class rules share ``Decision``, the holdout draw and the scoring with the
plain ones. Three parts, each under a ``# --`` heading: the plain rules
(:func:`decide`: bootstrap, forgetting, learning, McNemar, shadow), the rules for
a candidate that adds classes (:class:`ClassGate`, :func:`decide_classes`), and
the shell that runs both models on the same holdouts (:func:`evaluate`,
:func:`evaluate_classes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import binom

from continual.config import GateSettings, Settings
from continual.learn.evaluate import evaluate as evaluate_model
from continual.models.device import resolve_device
from continual.models.heads import added_classes
from continual.models.manifest import ModelSource
from continual.store import Store

# superseded: the candidate passed, but the champion it was measured against moved before its promotion.
Outcome = Literal["promoted", "rejected", "deferred", "superseded"]
# Accuracies are ratios of counts; compare with a tolerance so that an exactly
# equal accuracy never fails a ">=" rule through float rounding.
_EPS = 1e-9
# Holdouts are capped (seeded draw) so the gate's cost stays bounded as the store grows.
MAX_HOLDOUT = 5_000


# -- the plain rules: a candidate against the champion on the old and new holdouts ----------------------


@dataclass(frozen=True)
class Scores:
    """Per-sample correctness of one model on the old and new holdouts (same samples, same order)."""

    old_correct: np.ndarray
    new_correct: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "old_correct", np.asarray(self.old_correct, dtype=bool).ravel())
        object.__setattr__(self, "new_correct", np.asarray(self.new_correct, dtype=bool).ravel())

    @property
    def old_accuracy(self) -> float | None:
        return float(np.mean(self.old_correct)) if len(self.old_correct) else None

    @property
    def new_accuracy(self) -> float | None:
        return float(np.mean(self.new_correct)) if len(self.new_correct) else None


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    rule: str
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    shadow: bool = False

    @property
    def promote(self) -> bool:
        return self.outcome == "promoted"


def mcnemar_exact(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the candidate is better than the champion.

    ``b``: samples the candidate gets right and the champion wrong; ``c``: the
    reverse. Under the null (no difference) b ~ Binomial(b + c, 1/2); the p-value
    is P(X >= b). One-sided because the gate asks "is the improvement real", not
    "do they differ".

    >>> round(mcnemar_exact(10, 2), 6)  # (C(12,10) + C(12,11) + C(12,12)) / 2**12 = 79/4096
    0.019287
    >>> mcnemar_exact(0, 0)
    1.0
    """
    if b < 0 or c < 0:
        raise ValueError(f"b and c must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return float(binom.sf(b - 1, n, 0.5))


def decide(candidate: Scores, champion: Scores | None, gate: GateSettings) -> Decision:
    """Promote, reject or defer a candidate; the first rule that fails decides.

    With no champion (bootstrap) every holdout sample is new and an absolute
    ``min_accuracy`` floor applies. Otherwise, on the same samples: new accuracy
    >= champion's + ``min_new_improvement``; old accuracy >= champion's −
    ``max_old_forgetting``; and with ``significance`` > 0 an exact McNemar test
    on the paired new-holdout results. Too few holdout samples defers the
    decision (more feedback will come). ``shadow`` records but never promotes.
    """
    metrics: dict[str, Any] = {
        "candidate_old_accuracy": candidate.old_accuracy,
        "candidate_new_accuracy": candidate.new_accuracy,
        "n_old": len(candidate.old_correct),
        "n_new": len(candidate.new_correct),
    }
    if champion is None:
        decision = _bootstrap(candidate, gate, metrics)
    else:
        if len(champion.old_correct) != len(candidate.old_correct) or len(champion.new_correct) != len(
            candidate.new_correct
        ):
            raise ValueError("candidate and champion must be scored on the same holdout samples")
        metrics.update(champion_old_accuracy=champion.old_accuracy, champion_new_accuracy=champion.new_accuracy)
        decision = _against_champion(candidate, champion, gate, metrics)
    return _shadowed(Decision(decision.outcome, decision.rule, decision.reasons, metrics), gate)


def _shadowed(decision: Decision, gate: GateSettings) -> Decision:
    """``[gate] shadow``: a candidate that passed every rule is recorded, not promoted."""
    if gate.shadow and decision.promote:
        return Decision(
            "rejected",
            "shadow",
            [*decision.reasons, "shadow mode: passed every rule, recorded but not promoted"],
            decision.metrics,
            shadow=True,
        )
    return Decision(decision.outcome, decision.rule, decision.reasons, decision.metrics, shadow=gate.shadow)


def _bootstrap(candidate: Scores, gate: GateSettings, metrics: dict[str, Any]) -> Decision:
    holdout = np.concatenate([candidate.old_correct, candidate.new_correct])
    n = len(holdout)
    if n < gate.min_holdout_samples:
        return Decision(
            "deferred", "min_holdout_samples", [f"holdout has {n} samples, needs {gate.min_holdout_samples}"], metrics
        )
    acc = float(np.mean(holdout))
    metrics["candidate_accuracy"] = acc
    if acc + _EPS < gate.min_accuracy:
        return Decision("rejected", "min_accuracy", [f"accuracy {acc:.4f} < min_accuracy {gate.min_accuracy}"], metrics)
    return Decision(
        "promoted", "bootstrap", [f"first champion: accuracy {acc:.4f} >= min_accuracy {gate.min_accuracy}"], metrics
    )


def _against_champion(candidate: Scores, champion: Scores, gate: GateSettings, metrics: dict[str, Any]) -> Decision:
    n_old, n_new = len(candidate.old_correct), len(candidate.new_correct)
    if n_new < gate.min_holdout_samples or n_old < gate.min_holdout_samples:
        return Decision(
            "deferred",
            "min_holdout_samples",
            [f"holdouts have {n_old} old and {n_new} new samples, each needs {gate.min_holdout_samples}"],
            metrics,
        )
    new_c, new_ch = float(np.mean(candidate.new_correct)), float(np.mean(champion.new_correct))
    old_c, old_ch = float(np.mean(candidate.old_correct)), float(np.mean(champion.old_correct))
    passed = []
    need_new = new_ch + gate.min_new_improvement
    if new_c + _EPS < need_new:
        return Decision(
            "rejected",
            "min_new_improvement",
            [f"new-holdout accuracy {new_c:.4f} < champion's {new_ch:.4f} + {gate.min_new_improvement}"],
            metrics,
        )
    passed.append(f"new-holdout accuracy {new_c:.4f} >= champion's {new_ch:.4f} + {gate.min_new_improvement}")
    need_old = old_ch - gate.max_old_forgetting
    if old_c + _EPS < need_old:
        return Decision(
            "rejected",
            "max_old_forgetting",
            [*passed, f"old-holdout accuracy {old_c:.4f} < champion's {old_ch:.4f} − {gate.max_old_forgetting}"],
            metrics,
        )
    passed.append(f"old-holdout accuracy {old_c:.4f} >= champion's {old_ch:.4f} − {gate.max_old_forgetting}")
    if gate.significance > 0:
        b = int(np.sum(candidate.new_correct & ~champion.new_correct))
        c = int(np.sum(~candidate.new_correct & champion.new_correct))
        p = mcnemar_exact(b, c)
        metrics.update(mcnemar_b=b, mcnemar_c=c, mcnemar_p_value=p)
        if not p < gate.significance:
            return Decision(
                "rejected",
                "significance",
                [*passed, f"McNemar p = {p:.4g} (b={b}, c={c}) is not < significance {gate.significance}"],
                metrics,
            )
        passed.append(f"McNemar p = {p:.4g} (b={b}, c={c}) < {gate.significance}")
    return Decision("promoted", "all_rules_passed", passed, metrics)


# -- the rule for a candidate that adds classes ---------------------------------------------------------
# Per-class recall, not just averages: a grown head can take most of one old class's samples
# for the new class while the old-class accuracy barely moves, so besides the old-class
# accuracy every old class's recall is compared with the champion's.
# The order in which rules decide: the first that fails names the decision.
CLASS_RULES = ("min_class_holdout", "max_old_forgetting", "min_new_class_recall", "max_class_recall_drop")


@dataclass(frozen=True)
class ClassGate:
    """The thresholds of :func:`decide_classes` (:meth:`from_settings`: ``[gate]`` and ``[triggers]``).

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

    @classmethod
    def from_settings(cls, settings: Settings) -> ClassGate:
        g = settings.gate
        return cls(g.max_old_forgetting, g.min_new_class_recall, g.max_class_recall_drop,
                   settings.triggers.min_class_holdout)  # fmt: skip


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
    first failure in :data:`CLASS_RULES` order. ``metrics`` holds every number, JSON-able.

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
    n_new = len(y) - n_old
    cand_new = float(np.mean(cand[~is_old] == y[~is_old])) if n_new else None
    champ_new = float(np.mean(champ[~is_old] == y[~is_old])) if n_new else None
    checked = [c for c in old if counts[c] >= rule.min_class_holdout]
    drops = {c: _drop(champ_recall[c], cand_recall[c]) for c in old if counts[c]}
    metrics: dict[str, Any] = {
        "parent_classes": list(old),
        "new_classes": list(new),
        "n_holdout": len(y),
        "n_old": n_old,
        "n_new": n_new,
        "class_holdout": counts,
        "candidate_old_accuracy": cand_old,
        "champion_old_accuracy": champ_old,
        # "new" here is the new classes' samples (the champion cannot name them).
        "candidate_new_accuracy": cand_new,
        "champion_new_accuracy": champ_new,
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

    failed: dict[str, list[str]] = {r: [] for r in CLASS_RULES}
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
    first = next((r for r in CLASS_RULES if failed[r]), None)
    if first is None:
        return Decision("promoted", "all_rules_passed", passed, metrics)
    # The failures first (what an operator needs), then what passed.
    return Decision("rejected", first, [*(line for r in CLASS_RULES for line in failed[r]), *passed], metrics)


def _drop(champion: float | None, candidate: float | None) -> float:
    return (champion or 0.0) - (candidate or 0.0)


def _recall(y: np.ndarray, pred: np.ndarray, c: str) -> float | None:
    of_c = y == c
    return float(np.mean(pred[of_c] == c)) if of_c.any() else None


# -- the shell: both models on the same holdouts ------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    decision: Decision
    candidate: Scores
    champion: Scores | None


def holdouts(store: Store, parent_cutoff: int, data_cutoff: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Old holdout (at or before the champion's cutoff) and new holdout (after it, up to the candidate's)."""
    old = (
        store.draw(MAX_HOLDOUT, upto=parent_cutoff, split="holdout", seed=seed)
        if parent_cutoff
        else np.empty(0, np.int64)
    )
    new = store.draw(MAX_HOLDOUT, after=parent_cutoff, upto=data_cutoff, split="holdout", seed=seed)
    return old, new


def score(
    store: Store, models: ModelSource, settings: Settings, version: str, old: np.ndarray, new: np.ndarray
) -> Scores:
    """Per-sample correctness of ``version`` on both holdouts."""
    device = resolve_device(settings.serving.device)
    model = models.load_model(version, settings).to(device)
    result = evaluate_model(model, store, np.concatenate([old, new]), settings, device)
    correct = dict(zip(result.seqs.tolist(), (result.predictions == result.labels).tolist(), strict=True))
    return Scores(
        np.array([correct[s] for s in old if s in correct], bool),
        np.array([correct[s] for s in new if s in correct], bool),
    )


def predicted(
    store: Store, models: ModelSource, settings: Settings, version: str, seqs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seqs still stored, their stored labels, ``version``'s predicted class names), in the order of ``seqs``."""
    device = resolve_device(settings.serving.device)
    model = models.load_model(version, settings).to(device)
    r = evaluate_model(model, store, seqs, settings, device)
    return r.seqs if r.seqs is not None else np.empty(0, np.int64), r.label_names, r.predicted_names  # type: ignore[return-value]


def evaluate(store: Store, models: ModelSource, settings: Settings, candidate: str, parent: str | None) -> Evaluation:
    """Score the candidate and its parent (the champion it was trained from) on the same holdouts, and decide.

    A candidate whose classes extend its parent's goes through :func:`decide_classes`
    instead (see :func:`evaluate_classes`).
    """
    manifest = models.manifest(candidate)
    parent_manifest = models.manifest(parent) if parent else None
    if parent_manifest is not None:
        added = added_classes(parent_manifest.classes, manifest.classes)
        if added:
            return evaluate_classes(store, models, settings, candidate, parent_manifest.version, added)
    parent_cutoff = parent_manifest.data_cutoff if parent_manifest else 0
    old, new = holdouts(store, parent_cutoff, manifest.data_cutoff, seed=settings.training.seed)
    cand = score(store, models, settings, candidate, old, new)
    champ = score(store, models, settings, parent, old, new) if parent else None
    return Evaluation(decide(cand, champ, settings.gate), cand, champ)


def evaluate_classes(
    store: Store, models: ModelSource, settings: Settings, candidate: str, parent: str, added: Sequence[str]
) -> Evaluation:
    """A candidate that adds classes: the holdout is the parent's classes (old and new samples) and the new ones.

    A class-balanced draw of holdout samples up to the candidate's data cutoff,
    so a new class with few samples is measured on all of them; labels neither
    model has (classes not ready yet) are left out. Both models predict every
    sample; :func:`decide_classes` compares them class by class. The returned
    :class:`Scores` hold the old-class samples as "old" and the new-class samples
    as "new" (for ``continual_model_accuracy_ratio``).
    """
    manifest = models.manifest(candidate)
    parent_classes = models.manifest(parent).classes
    drawn = store.draw(
        MAX_HOLDOUT, upto=manifest.data_cutoff, split="holdout", balanced=True, seed=settings.training.seed
    )
    seqs, labels, cand = predicted(store, models, settings, candidate, drawn)
    _, _, champ = predicted(store, models, settings, parent, seqs)
    keep = np.isin(labels, list(manifest.classes))
    labels, cand, champ = labels[keep], cand[keep], champ[keep]
    decision = _shadowed(
        decide_classes(labels, cand, champ, parent_classes, added, ClassGate.from_settings(settings)), settings.gate
    )
    is_old = np.isin(labels, list(parent_classes))
    right_c, right_p = cand == labels, champ == labels
    return Evaluation(
        decision,
        Scores(right_c[is_old], right_c[~is_old]),
        Scores(right_p[is_old], right_p[~is_old]),
    )
