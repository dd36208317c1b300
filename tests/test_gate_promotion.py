"""The gate's promotion is a compare-and-swap from the candidate's parent: an operator's move in between wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from looputil import make_loop
from modelutil import feed, trained_model
from testkit import digit_samples

from continual import gate
from continual.models import build_model
from continual.service import trainer
from continual.service.context import ServiceContext


def _setup(tmp_path: Path) -> tuple[ServiceContext, str, str, str]:
    """Champion ``parent`` (untrained, previous ``first``) and a trained candidate built from it."""
    ctx = make_loop(tmp_path)
    s, reg = ctx.settings, ctx.registry
    spec = s.model.input.model_dump(mode="json")
    feed(ctx.store, digit_samples("original", stop=900))
    half = ctx.store.max_seq() // 2
    torch.manual_seed(1)
    first = reg.import_model(build_model(s.model), input_spec=spec, data_cutoff=half).version
    torch.manual_seed(2)
    parent = reg.import_model(build_model(s.model), input_spec=spec, data_cutoff=half).version
    model = trained_model(s)
    candidate = reg.write_version(
        model.state_dict(),
        architecture=model.architecture,
        classes=model.classes,
        input_spec=spec,
        parent=parent,
        data_cutoff=ctx.store.max_seq(),
    ).version
    return ctx, first, parent, candidate


def test_a_candidate_that_passes_is_promoted_from_its_parent(tmp_path: Path) -> None:
    ctx, _first, parent, candidate = _setup(tmp_path)
    decision = trainer.gate_run(ctx, 1, candidate, parent)
    assert decision.outcome == "promoted", decision.reasons
    assert ctx.store.versions.champion_version() == candidate
    assert ctx.metrics.registry.get_sample_value("continual_promotions_total") == 1


def test_a_rollback_between_the_gates_decision_and_its_promotion_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, first, parent, candidate = _setup(tmp_path)
    evaluate = gate.evaluate

    def decide_then_an_operator_rolls_back(*args: object, **kw: object) -> gate.Evaluation:
        evaluation = evaluate(*args, **kw)  # type: ignore[arg-type]
        assert evaluation.decision.promote  # the gate would promote ...
        assert ctx.registry.rollback(actor="token:admin") == (parent, first)  # ... but the champion moves first
        return evaluation

    monkeypatch.setattr(gate, "evaluate", decide_then_an_operator_rolls_back)
    decision = trainer.gate_run(ctx, 1, candidate, parent)

    assert (decision.outcome, decision.rule) == ("deferred", "champion_changed")
    assert f"moved from {parent} to {first}" in decision.reasons[-1]
    assert ctx.store.versions.champion_version() == first  # the rollback stands
    assert ctx.store.versions.history()[0]["reason"] == "rollback"
    recorded = ctx.store.records.last_decision()
    assert recorded is not None and (recorded["outcome"], recorded["rule"]) == ("deferred", "champion_changed")
    assert ctx.store.versions.get(candidate)["status"] == "candidate"  # neither champion nor rejected
    assert ctx.metrics.registry.get_sample_value("continual_promotions_total") == 0
