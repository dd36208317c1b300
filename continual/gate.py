"""The promotion gate: candidate vs champion on the same old and new holdout samples.

The rule is a pure function (:func:`decide`) of per-sample correctness; the shell
(:func:`evaluate`) draws the holdouts, runs both models on them and decides.
Promoting, recording and metrics belong to the caller (``continual.service.trainer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import binom

from continual.config import GateSettings, Settings
from continual.learn.evaluate import evaluate as evaluate_model
from continual.models.device import resolve_device
from continual.models.manifest import ModelSource
from continual.store import Store

Outcome = Literal["promoted", "rejected", "deferred"]
# Accuracies are ratios of counts; compare with a tolerance so that an exactly
# equal accuracy never fails a ">=" rule through float rounding.
_EPS = 1e-9
# Holdouts are capped (seeded draw) so the gate's cost stays bounded as the store grows.
MAX_HOLDOUT = 5_000


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
    if gate.shadow and decision.promote:
        return Decision(
            "rejected",
            "shadow",
            [*decision.reasons, "shadow mode: passed every rule, recorded but not promoted"],
            metrics,
            shadow=True,
        )
    return Decision(decision.outcome, decision.rule, decision.reasons, metrics, shadow=gate.shadow)


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


def evaluate(store: Store, models: ModelSource, settings: Settings, candidate: str, parent: str | None) -> Evaluation:
    """Score the candidate and its parent (the champion it was trained from) on the same holdouts, and decide."""
    manifest = models.manifest(candidate)
    parent_cutoff = models.manifest(parent).data_cutoff if parent else 0
    old, new = holdouts(store, parent_cutoff, manifest.data_cutoff, seed=settings.training.seed)
    cand = score(store, models, settings, candidate, old, new)
    champ = score(store, models, settings, parent, old, new) if parent else None
    return Evaluation(decide(cand, champ, settings.gate), cand, champ)
