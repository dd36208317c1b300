from __future__ import annotations

import json

import pytest

from continual.gate import CLASS_RULES, ClassGate, decide_classes

OLD = ["a", "b", "c"]
NEW = ["d"]
GATE = ClassGate(max_old_forgetting=0.05, min_new_class_recall=0.8, max_class_recall_drop=0.1, min_class_holdout=10)


def holdout(per_class: dict[str, int]) -> list[str]:
    return [c for c, n in per_class.items() for _ in range(n)]


def predict(labels: list[str], wrong: dict[str, int], as_class: str | dict[str, str] = "x") -> list[str]:
    """The labels with the first ``wrong[c]`` samples of class ``c`` predicted as ``as_class`` (or its map)."""
    out, seen = [], dict.fromkeys(wrong, 0)
    for y in labels:
        if y in wrong and seen[y] < wrong[y]:
            seen[y] += 1
            out.append(as_class if isinstance(as_class, str) else as_class[y])
        else:
            out.append(y)
    return out


Y = holdout({"a": 20, "b": 20, "c": 20, "d": 10})
# The champion (the parent) cannot predict "d"; it gets every old sample right.
CHAMP = predict(Y, {"d": 10}, "a")


def test_promotes_when_every_rule_passes_and_records_every_number() -> None:
    cand = predict(Y, {"a": 1, "d": 1}, "b")
    d = decide_classes(Y, cand, CHAMP, OLD, NEW, GATE)
    assert (d.outcome, d.rule) == ("promoted", "all_rules_passed")
    m = d.metrics
    assert m["candidate_recall"] == {"a": 0.95, "b": 1.0, "c": 1.0, "d": 0.9}
    assert m["champion_recall"] == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}
    assert m["class_holdout"] == {"a": 20, "b": 20, "c": 20, "d": 10}
    assert m["candidate_old_accuracy"] == pytest.approx(59 / 60) and m["champion_old_accuracy"] == 1.0
    assert m["recall_drop"]["a"] == pytest.approx(0.05) and m["n_old"] == 60
    assert json.loads(json.dumps(m)) == m
    assert any("new class 'd' recall 0.9000 >= min_new_class_recall 0.8" in r for r in d.reasons)


def test_new_class_recall_exactly_at_the_threshold_passes_and_epsilon_below_fails() -> None:
    cand = predict(Y, {"d": 2}, "a")  # recall 8/10 = 0.8
    assert decide_classes(Y, cand, CHAMP, OLD, NEW, GATE).outcome == "promoted"
    strict = ClassGate(0.05, 0.8 + 1e-6, 0.1, 10)
    d = decide_classes(Y, cand, CHAMP, OLD, NEW, strict)
    assert (d.outcome, d.rule) == ("rejected", "min_new_class_recall")
    assert d.reasons[0].startswith("new class 'd' recall 0.8000 < min_new_class_recall")


def test_class_recall_drop_exactly_at_the_threshold_passes_and_epsilon_below_fails() -> None:
    cand = predict(Y, {"a": 2}, "d")  # a: 1.0 -> 0.9, a drop of 0.1 (0.09999999999999998 in floats)
    assert decide_classes(Y, cand, CHAMP, OLD, NEW, ClassGate(0.05, 0.8, 0.1, 10)).outcome == "promoted"
    d = decide_classes(Y, cand, CHAMP, OLD, NEW, ClassGate(0.05, 0.8, 0.1 - 1e-6, 10))
    assert (d.outcome, d.rule) == ("rejected", "max_class_recall_drop")
    assert "old class 'a' recall 0.9000, champion's 1.0000: drop 0.1000 > max_class_recall_drop" in d.reasons[0]


def test_old_accuracy_exactly_at_the_threshold_passes_and_epsilon_below_fails() -> None:
    cand = predict(Y, {"a": 1, "b": 1, "c": 1}, "d")  # old accuracy 57/60 = 0.95 = 1.0 - 0.05
    assert decide_classes(Y, cand, CHAMP, OLD, NEW, GATE).outcome == "promoted"
    d = decide_classes(Y, cand, CHAMP, OLD, NEW, ClassGate(0.05 - 1e-6, 0.8, 0.1, 10))
    assert (d.outcome, d.rule) == ("rejected", "max_old_forgetting")
    # Float rounding must not fail an exact tie: 42/60 = 0.7 but 48/60 - 0.1 = 0.7000000000000001.
    champ = predict(Y, {"a": 4, "b": 4, "c": 4, "d": 10}, "x")
    cand = predict(Y, {"a": 6, "b": 6, "c": 6}, "x")
    d = decide_classes(Y, cand, champ, OLD, NEW, ClassGate(0.1, 0.8, 0.1, 10))
    assert d.metrics["candidate_old_accuracy"] < d.metrics["champion_old_accuracy"] - 0.1
    assert d.outcome == "promoted", d.reasons


def test_one_collapsed_class_rejects_even_when_the_average_is_fine() -> None:
    # Many old classes, one of them ("c") mostly taken by the new class: old accuracy drops by only
    # 5/120 = 0.042, within max_old_forgetting, but c's recall falls from 1.0 to 0.75.
    y = holdout({**{k: 20 for k in "abcefg"}, "d": 10})
    old = ["a", "b", "c", "e", "f", "g"]
    champ = predict(y, {"d": 10}, "a")
    cand = predict(y, {"c": 5}, "d")
    d = decide_classes(y, cand, champ, old, NEW, GATE)
    assert d.metrics["candidate_old_accuracy"] >= d.metrics["champion_old_accuracy"] - GATE.max_old_forgetting
    assert (d.outcome, d.rule) == ("rejected", "max_class_recall_drop")
    assert len(d.reasons) > 1 and "'c'" in d.reasons[0]
    assert d.metrics["recall_drop"]["c"] == pytest.approx(0.25)


def test_too_few_holdout_samples_of_a_new_class_defers() -> None:
    y = holdout({"a": 20, "b": 20, "c": 20, "d": 9, "e": 12})
    d = decide_classes(y, y, y, OLD, ["d", "e"], GATE)
    assert (d.outcome, d.rule) == ("deferred", "min_class_holdout")
    assert d.reasons == ["new class 'd' has 9 holdout samples, needs 10"]
    no_old = holdout({"d": 12})
    d = decide_classes(no_old, no_old, no_old, OLD, NEW, GATE)
    assert d.outcome == "deferred" and "no samples of the parent's classes" in d.reasons[0]


def test_a_rare_old_class_is_left_out_of_the_per_class_check_only() -> None:
    y = holdout({"a": 20, "b": 20, "c": 3, "d": 10})
    champ = predict(y, {"d": 10}, "a")
    cand = predict(y, {"c": 2}, "d")  # c: 1.0 -> 0.33 on 3 samples
    d = decide_classes(y, cand, champ, OLD, NEW, GATE)
    assert d.outcome == "promoted" and d.metrics["unchecked_old_classes"] == ["c"]
    assert d.metrics["recall_drop"]["c"] == pytest.approx(2 / 3)


def test_every_failure_is_listed_and_the_first_rule_decides() -> None:
    cand = predict(Y, {"a": 10, "d": 5}, "b")
    d = decide_classes(Y, cand, CHAMP, OLD, NEW, GATE)
    assert d.rule == "max_old_forgetting" == CLASS_RULES[1]
    joined = "\n".join(d.reasons)
    assert "old-class accuracy" in joined and "new class 'd' recall 0.5000" in joined and "'a' recall 0.5000" in joined


def test_bad_arguments_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"max_class_recall_drop must be in \[0, 1\], got 1\.5"):
        ClassGate(0.02, 0.5, 1.5, 10)
    with pytest.raises(ValueError, match="min_class_holdout must be >= 1, got 0"):
        ClassGate(0.02, 0.5, 0.1, 0)
    with pytest.raises(ValueError, match="got 70, 69 and 70"):
        decide_classes(Y, Y[:-1], CHAMP, OLD, NEW, GATE)
    with pytest.raises(ValueError, match="\\['c'\\] are already among parent_classes"):
        decide_classes(Y, Y, CHAMP, OLD, ["c", "d"], GATE)
    with pytest.raises(ValueError, match="holdout labels \\['z'\\] are in neither"):
        decide_classes([*Y, "z"], [*Y, "z"], [*CHAMP, "z"], OLD, NEW, GATE)
    with pytest.raises(ValueError, match="new_classes is empty"):
        decide_classes(Y, Y, CHAMP, OLD, [], GATE)


# -- the shell: gate.evaluate sends a candidate that adds classes through decide_classes ----------------
def _versions(tmp_path, bias_9: float = 0.0):  # type: ignore[no-untyped-def]
    """A store with the digits, a parent that knows 0-8 and a candidate that adds 9 (the parent's rows + one)."""
    import torch
    from looputil import make_loop
    from modelutil import feed, trained_model
    from testkit import digit_samples

    from continual.models import Classifier

    ctx = make_loop(tmp_path, {"triggers": {"min_class_holdout": 10}})
    s, reg = ctx.settings, ctx.registry
    spec = s.model.input.model_dump(mode="json")
    feed(ctx.store, digit_samples("original", stop=900))
    full = trained_model(s)
    head = torch.nn.Linear(full.head.in_features, 9)
    with torch.no_grad():
        head.weight.copy_(full.head.weight[:9])
        head.bias.copy_(full.head.bias[:9])
        full.head.bias[9] += bias_9
    parent_model = Classifier(full.backbone, head, [str(i) for i in range(9)], architecture="mlp")
    parent = reg.import_model(parent_model, input_spec=spec, data_cutoff=ctx.store.max_seq() // 2).version
    candidate = reg.write_version(full.state_dict(), architecture="mlp", classes=full.classes, input_spec=spec,
                                  parent=parent, data_cutoff=ctx.store.max_seq()).version  # fmt: skip
    return ctx, parent, candidate


def test_evaluate_judges_a_grown_candidate_class_by_class(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from continual import gate

    ctx, parent, candidate = _versions(tmp_path)
    ev = gate.evaluate(ctx.store, ctx.registry, ctx.settings, candidate, parent)
    d, m = ev.decision, ev.decision.metrics
    assert (d.outcome, d.rule) == ("promoted", "all_rules_passed"), d.reasons
    assert m["new_classes"] == ["9"] and m["parent_classes"] == [str(i) for i in range(9)]
    # The holdout is every holdout sample up to the candidate's cutoff, old samples of the parent's classes too.
    n9 = ctx.store.count(label="9", split="holdout")
    assert m["class_holdout"]["9"] == n9 == m["n_new"] and m["n_old"] + n9 == ctx.store.count(split="holdout")
    assert m["champion_recall"]["9"] == 0.0 and m["candidate_recall"]["9"] > 0.8
    assert len(ev.candidate.new_correct) == n9 and ev.champion is not None and not ev.champion.new_correct.any()
    assert m["candidate_old_accuracy"] == pytest.approx(ev.candidate.old_accuracy)
    json.dumps(m)  # recorded as is


def test_evaluate_rejects_a_grown_candidate_whose_new_class_takes_old_samples(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from continual import gate

    ctx, parent, candidate = _versions(tmp_path, bias_9=3.0)
    d = gate.evaluate(ctx.store, ctx.registry, ctx.settings, candidate, parent).decision
    # The old-class accuracy stays within max_old_forgetting (0.05 here): only the per-class check sees it.
    m = d.metrics
    assert m["candidate_old_accuracy"] >= m["champion_old_accuracy"] - ctx.settings.gate.max_old_forgetting
    assert (d.outcome, d.rule) == ("rejected", "max_class_recall_drop"), d.reasons
    assert any(r.startswith("old class '5'") and " > " in r for r in d.reasons)
    assert max(m["recall_drop"].values()) > ctx.settings.gate.max_class_recall_drop
