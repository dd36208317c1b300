"""Runs that add classes: the class plan, the loop's distillation and bias terms, the worker growing the head."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from learnutil import fill, run_here, settings_dict
from testkit import digit_arrays, merge
from torch import nn

from continual.config import Settings, settings_from_dict
from continual.learn.classes import ClassesChanged, new_class_counts, plan_classes
from continual.learn.evaluate import evaluate
from continual.learn.run import create_run
from continual.learn.train import balanced_accuracy_on, train
from continual.models import build_model
from continual.models.heads import grow_classifier
from continual.registry import Registry
from continual.store import Store


@dataclass(frozen=True)
class Count:
    label: str
    train: int
    holdout: int


def settings(tmp_path: Path, url: str = "sqlite://", **over: object) -> Settings:
    base = settings_dict(tmp_path, url, epochs=4)
    model = {"classes": ["0", "1", "2"], "new_classes": "accept", "hidden": [32]}
    base = merge(base, {"model": model, "triggers": {"min_class_samples": 30, "min_class_holdout": 5}})
    return settings_from_dict(merge(base, over))


# -- the plan -------------------------------------------------------------------------------------
def test_a_ready_class_is_appended_and_the_others_wait(tmp_path: Path) -> None:
    s = settings(tmp_path)
    counts = [Count("0", 99, 20), Count("x", 30, 5), Count("y", 29, 50), Count("z", 80, 4), Count("w", 40, 9)]
    plan = plan_classes("v1", ("0", "1", "2"), counts, s)
    assert plan.classes == ("0", "1", "2", "x", "w") and plan.added == ("x", "w") and plan.waiting == ("y", "z")
    # The parent's own grown classes stay where they are; only what it lacks is new.
    assert plan_classes("v2", ("0", "1", "2", "x"), counts, s).added == ("w",)
    # Bootstrap: the configured classes, then the ready ones.
    assert plan_classes(None, None, counts, s).classes == ("0", "1", "2", "x", "w")
    # max_classes bounds what joins; refuse lets no feedback label in.
    assert plan_classes("v1", ("0", "1", "2"), counts, settings(tmp_path, model={"max_classes": 4})).added == ("x",)
    refuse = settings(tmp_path, model={"new_classes": "refuse"})
    assert plan_classes("v1", ("0", "1", "2"), counts, refuse).added == ()
    assert new_class_counts(("0", "1", "2"), counts, refuse) == []


def test_classes_may_only_be_appended(tmp_path: Path) -> None:
    s = settings(tmp_path)
    # A configured class appended by the operator joins like a new one once it is ready.
    appended = settings(tmp_path, model={"classes": ["0", "1", "2", "3"], "new_classes": "refuse"})
    assert plan_classes("v1", ("0", "1", "2"), [Count("3", 30, 5)], appended).added == ("3",)
    # The parent may extend the configured list (it grew before).
    assert plan_classes("v1", ("0", "1", "2", "x"), [], s).classes == ("0", "1", "2", "x")
    for parent in [("0", "2", "1"), ("0", "2"), ("1", "2", "0", "x")]:
        with pytest.raises(ClassesChanged, match="can only be appended"):
            plan_classes("v1", parent, [], s)


# -- the loop's terms ------------------------------------------------------------------------------
def _task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(3).repeat_interleave(40)
    return centres[y] + torch.randn(len(y), 8, generator=g), y


def _loop(model, s: Settings, teacher=None, n_old: int = 0, first_losses: list | None = None):  # type: ignore[no-untyped-def]
    x, y = _task()
    batches = [(x[b], y[b]) for b in torch.randperm(len(x), generator=torch.Generator().manual_seed(1)).split(24)]
    val = [(x[::3], y[::3])]

    def record(p: dict) -> None:
        if first_losses is not None and p.get("phase") == "training" and p["step"] == 1:
            first_losses.append(p["loss"])

    torch.manual_seed(0)
    return train(
        model, s, lambda epoch: batches, steps_per_epoch=len(batches), device=torch.device("cpu"),
        val_batches=lambda: val, teacher=teacher, n_old=n_old, on_progress=record,
    )  # fmt: skip


def _vector_model(s: Settings, classes: tuple[str, ...] = ("0", "1", "2")):  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    m = s.model.model_copy(update={"classes": classes, "input": s.model.input.model_copy(update={"shape": (8,)})})
    return build_model(m)


def test_the_distillation_term_is_zero_when_the_candidate_equals_the_parent(tmp_path: Path) -> None:
    s = settings(tmp_path, training={"distill_weight": 5.0, "bias_correction": False, "epochs": 1})
    plain, distilled, other = [], [], []
    _loop(_vector_model(s), s, first_losses=plain)
    model = _vector_model(s)
    _loop(model, s, teacher=copy.deepcopy(model), n_old=3, first_losses=distilled)
    assert distilled == plain  # the first step: the student is its teacher, the term adds exactly 0
    stranger = _vector_model(s)
    torch.nn.init.normal_(stranger.head.weight, std=3.0)
    _loop(_vector_model(s), s, teacher=stranger, n_old=3, first_losses=other)
    assert other[0] > plain[0] + 0.1


def test_bias_correction_is_fitted_on_the_validation_slice_and_folded_into_the_new_rows(tmp_path: Path) -> None:
    on = settings(tmp_path, training={"distill_weight": 0.0, "epochs": 3})
    off = settings(tmp_path, training={"distill_weight": 0.0, "epochs": 3, "bias_correction": False})
    parent = _vector_model(on, ("0", "1"))
    grown = [grow_classifier(parent, ("0", "1", "2"), init="random") for _ in range(2)]
    corrected = _loop(grown[0], on, teacher=parent, n_old=2)
    plain = _loop(grown[1], off, teacher=parent, n_old=2)
    assert plain.bias_correction == {"skipped": "[training] bias_correction = false"}
    # Epochs are scored by the mean recall per class (what the gate judges), not plain accuracy, and the kept
    # one is the latest whose score is within one standard error of the best: none after it is.
    scores = {
        r["epoch"]: (r["validation_balanced_accuracy"], r["validation_balanced_accuracy_se"]) for r in plain.history
    }
    best_epoch, (best, _) = max(scores.items(), key=lambda kv: (kv[1][0], -kv[0]))
    kept, se = scores[plain.best_epoch]
    assert plain.validation_accuracy == kept and plain.best_epoch >= best_epoch and kept >= best - se
    assert all(score < best - e_se for e, (score, e_se) in scores.items() if e > plain.best_epoch)
    assert all(0 <= e_se < 0.5 for _, e_se in scores.values())
    fit = corrected.bias_correction
    assert fit is not None and fit["alpha"] > 0 and fit["n"] == 40
    a, b = grown[0].head, grown[1].head  # same seed, same steps: they differ by the fold only
    assert torch.equal(a.weight[:2], b.weight[:2]) and torch.equal(a.bias[:2], b.bias[:2])
    torch.testing.assert_close(a.weight[2], fit["alpha"] * b.weight[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.bias[2], fit["alpha"] * b.bias[2] + fit["beta"], rtol=1e-4, atol=1e-4)


def _noisy_run(tmp_path: Path, spread: float):  # type: ignore[no-untyped-def]
    """A run that adds class 2, at a constant LR high enough that the validation score wanders epoch to epoch."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(60)
    x = (torch.randn(3, 8, generator=g) * spread)[y] + torch.randn(len(y), 8, generator=g)
    batches = [(x[b], y[b]) for b in torch.randperm(len(x), generator=torch.Generator().manual_seed(1)).split(24)]
    training = {"distill_weight": 0.0, "epochs": 10, "bias_correction": False, "early_stopping_patience": 10}
    training |= {"learning_rate": 0.2, "head_learning_rate": 0.2, "lr_schedule": "constant"}
    s = settings(tmp_path, training=training)
    parent = _vector_model(s, ("0", "1"))
    torch.manual_seed(0)
    return train(
        grow_classifier(parent, ("0", "1", "2"), init="random"), s, lambda epoch: batches,
        steps_per_epoch=len(batches), device=torch.device("cpu"), val_batches=lambda: [(x[::4], y[::4])],
        teacher=parent, n_old=2,
    )  # fmt: skip


def test_a_run_that_adds_classes_keeps_the_latest_epoch_within_one_standard_error_of_the_best(tmp_path: Path) -> None:
    r = _noisy_run(tmp_path, spread=0.8)
    score = {h["epoch"]: h["validation_balanced_accuracy"] for h in r.history}
    se = {h["epoch"]: h["validation_balanced_accuracy_se"] for h in r.history}
    best = max(score.values())
    first_best = min(e for e, v in score.items() if v == best)
    # The last epoch scores below the best, by less than its standard error: it is kept, not the first best.
    assert r.best_epoch == 10 and first_best < 10
    assert best - se[10] <= score[10] < best and r.validation_accuracy == score[10]
    # A slice every late epoch gets right cannot tell them apart: the latest of the tied is kept.
    tied = _noisy_run(tmp_path, spread=1.5)
    assert tied.history[-1]["validation_balanced_accuracy"] == 1.0 and tied.best_epoch == 10


def test_balanced_accuracy_and_its_standard_error() -> None:
    # Class 0: 3 of 4 right; class 1: 1 of 2 right; class 2: 2 of 2 right.
    logits = torch.eye(3)[[0, 0, 0, 1, 1, 0, 2, 2]]
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    acc, se = balanced_accuracy_on(nn.Identity(), [(logits, y)], torch.device("cpu"))
    assert acc == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert se == pytest.approx(np.sqrt(0.75 * 0.25 / 4 + 0.5 * 0.5 / 2 + 0.0) / 3)
    assert balanced_accuracy_on(nn.Identity(), [], torch.device("cpu")) == (0.0, 0.0)


# -- the worker ------------------------------------------------------------------------------------
def _run(store: Store, s: Settings) -> dict:
    return run_here(store, s, create_run(store, s, trigger="test"))


def _digits(store: Store, classes: list[int], prefix: str, start: int = 0, stop: int = 10_000) -> None:
    x, y = digit_arrays()
    keep = np.flatnonzero(np.isin(y, classes))[start:stop]
    fill(store, x[keep], y[keep], prefix)


def test_a_run_with_a_new_class_grows_the_head(store: Store, tmp_path: Path) -> None:
    s = settings(tmp_path, store.url, training={"strategy": "replay+ewc", "epochs": 6})
    registry = Registry(s.models_dir, store)
    _digits(store, [0, 1, 2], "a", stop=400)
    first = _run(store, s)
    assert first["status"] == "succeeded", first["error"]
    v1 = first["candidate_version"]
    registry.promote(v1, expected=None, reason="manual")
    _digits(store, [3], "b", stop=20)  # too few: not ready, skipped like any unknown label
    _digits(store, [0, 1, 2], "b2", start=400, stop=450)
    waiting = _run(store, s)
    assert waiting["status"] == "succeeded", waiting["error"]
    assert registry.manifest(waiting["candidate_version"]).classes == ("0", "1", "2")
    assert waiting["metrics"]["classes"]["waiting"] == ["3"] and waiting["metrics"]["skipped_unknown_labels"] > 0
    assert waiting["metrics"]["replay_ratio"] == s.training.replay_ratio  # no class added: the configured mix

    _digits(store, [3], "c", start=20, stop=160)
    _digits(store, [0, 1, 2], "d", start=450, stop=500)
    row = _run(store, s)
    assert row["status"] == "succeeded", row["error"]
    m = registry.manifest(row["candidate_version"])
    assert m.classes == ("0", "1", "2", "3") and m.parent == v1
    assert m.extra["parent_classes"] == ["0", "1", "2"] and m.extra["added_classes"] == ["3"]
    got = row["metrics"]["classes"]
    assert got["added"] == ["3"] and got["head_init"] == "imprint" and got["imprint_samples"]["3"] > 50
    assert got["bias_correction"]["alpha"] > 0
    # Three old classes and one new: each class a quarter of every batch, so the replayed share is 3/4.
    assert row["metrics"]["replay_ratio"] == 0.75
    # Every sample of the new class trains, also the 20 stored before the parent's cutoff.
    n3 = store.count(label="3", split="train")
    assert row["metrics"]["new_samples"] + row["metrics"]["validation_samples"] >= n3
    # EWC: the candidate's Fisher has a row per class; the grown head's old rows carry the parent's (decayed).
    parent_fisher, fisher = registry.load_tensors(v1, "fisher"), registry.load_tensors(m.version, "fisher")
    assert fisher["head.weight"].shape[0] == 4
    assert (fisher["head.weight"][:3] >= s.training.fisher_decay * parent_fisher["head.weight"] - 1e-6).all()
    # The grown model names the new class (its holdout samples: training never saw them).
    r = evaluate(registry.load_model(m.version, s), store, store.draw(10_000, split="holdout"), s)
    assert r.classes == m.classes and np.mean(r.predicted_names[r.label_names == "3"] == "3") > 0.8


def test_a_reordered_class_list_fails_the_run(store: Store, tmp_path: Path) -> None:
    s = settings(tmp_path, store.url, training={"epochs": 1})
    registry = Registry(s.models_dir, store)
    _digits(store, [0, 1, 2], "a", stop=200)
    registry.promote(_run(store, s)["candidate_version"], expected=None, reason="manual")
    _digits(store, [0, 1, 2], "b", start=200, stop=300)
    row = _run(store, settings(tmp_path, store.url, model={"classes": ["0", "2", "1"]}))
    assert row["status"] == "failed" and "ClassesChanged" in row["error"] and "only be appended" in row["error"]
