"""Live and estimated accuracy: the trigger rule on the estimate, and the accuracy, check and retention jobs
called directly over a real store (no scheduler, no HTTP)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from looputil import make_loop

from continual.config import load_settings
from continual.models import build_model
from continual.predlog import new_prediction_id
from continual.service import jobs
from continual.service.context import ServiceContext
from continual.status import accuracy_status, gate_accuracy
from continual.store import NewSample, PredictionRecord
from continual.triggers import TriggerInput, estimate_low, labels_needed, pick_estimate, trigger_reason

CALIBRATION = {"temperature": 1.5, "accuracy": 0.9, "confidence_quantiles": list(np.linspace(0.5, 1.0, 201))}


def test_the_estimate_rule_is_off_by_default_and_starts_a_run_only_with_enough_labels() -> None:
    s = load_settings(None, env={}, require_file=False)
    t = TriggerInput
    assert s.triggers.min_estimated_accuracy == 0  # off: a low estimate changes nothing
    assert trigger_reason(t(True, 600, 1_000.0, False, estimated_accuracy=0.1), s.triggers) is None
    assert labels_needed(t(True, 10, 1_000.0, False, estimated_accuracy=0.1), s.triggers) == 0
    trig = s.triggers.model_copy(update={"min_estimated_accuracy": 0.8})  # min_new_samples 500
    reason = trigger_reason(t(True, 600, 1_000.0, False, estimated_accuracy=0.72), trig)
    assert reason == "estimated accuracy 0.720 < min_estimated_accuracy 0.8 with 600 new samples"
    # It names the estimate even when drift was detected too.
    assert trigger_reason(t(True, 600, 1_000.0, True, estimated_accuracy=0.72), trig).startswith("estimated")
    # Too few labels: no run, and how many more the run needs.
    assert trigger_reason(t(True, 120, 1_000.0, False, estimated_accuracy=0.72), trig) is None
    assert labels_needed(t(True, 120, 1_000.0, False, estimated_accuracy=0.72), trig) == 380
    # High enough, no estimate yet, or no champion: nothing asked for.
    assert trigger_reason(t(True, 600, 1_000.0, False, estimated_accuracy=0.85), trig) is None
    assert labels_needed(t(True, 120, 1_000.0, False, estimated_accuracy=0.85), trig) == 0
    assert labels_needed(t(True, 120, 1_000.0, False), trig) == 0
    assert labels_needed(t(False, 120, None, False, estimated_accuracy=0.1), trig) == 0
    # The cooldown and "nothing new since the last run" still hold.
    assert trigger_reason(t(True, 600, 10.0, False, estimated_accuracy=0.5), trig) is None
    assert trigger_reason(t(True, 600, 1_000.0, False, estimated_accuracy=0.5, new_since_last_run=False), trig) is None
    assert estimate_low(0.79, trig) and not estimate_low(0.8, trig) and not estimate_low(None, trig)
    assert pick_estimate({"atc": None, "confidence": 0.7}, "atc") == 0.7  # uncalibrated: the mean confidence
    assert pick_estimate({"atc": 0.6, "confidence": 0.7}, "atc") == 0.6 and pick_estimate(None, "atc") is None


def test_gate_accuracy_combines_the_two_holdouts() -> None:
    assert gate_accuracy({"candidate_accuracy": 0.9, "n_old": 0, "n_new": 50}) == (0.9, 50)
    metrics = {"candidate_old_accuracy": 0.8, "candidate_new_accuracy": 1.0, "n_old": 30, "n_new": 10}
    assert gate_accuracy(metrics) == (pytest.approx(0.85), 40)
    assert gate_accuracy({}) is None and gate_accuracy(None) is None


def add_version(ctx: ServiceContext, seed: int, *, calibration: dict | None, gate: dict | None) -> str:
    torch.manual_seed(seed)
    m = ctx.registry.import_model(
        build_model(ctx.settings.model),
        input_spec=ctx.settings.model.input.model_dump(mode="json"),
        extra={"calibration": calibration} if calibration else None,
    )
    if gate:
        ctx.store.versions.set_metrics(m.version, gate)
    return m.version


def log_predictions(ctx: ServiceContext, version: str, conf: list[float], *, ago: float = 60.0) -> list[str]:
    """Predictions of ``version`` made ``ago`` seconds back (settled: old enough to go into windows)."""
    at = datetime.now(UTC) - timedelta(seconds=ago)
    pids = [new_prediction_id() for _ in conf]
    ctx.store.predictions.insert([
        PredictionRecord(pid, at, version, "3", c, {"3": c}, "vector", "ab" * 32, np.zeros(64, "<f4").tobytes(), "all")
        for pid, c in zip(pids, conf, strict=True)
    ])  # fmt: skip
    return pids


def label(ctx: ServiceContext, pids: list[str], labels: list[str]) -> None:
    ctx.store.insert([
        NewSample(f"prediction:{p}", y, "vector", np.zeros(64, "<f4").tobytes(), prediction_id=p,
                  predicted_at=datetime.now(UTC))
        for p, y in zip(pids, labels, strict=True)
    ])  # fmt: skip


def value(ctx: ServiceContext, name: str, **labels: str) -> float | None:
    return ctx.metrics.registry.get_sample_value(name, labels)


def test_live_accuracy_per_version_windows_estimates_and_their_error(tmp_path: Path) -> None:
    ctx = make_loop(tmp_path, {"accuracy": {"estimate_window": 20, "live_window": 30, "min_labels": 10}})
    old = add_version(ctx, 1, calibration=None, gate={"candidate_accuracy": 0.95, "n_old": 0, "n_new": 200})
    new = add_version(ctx, 2, calibration=CALIBRATION,
                      gate={"candidate_old_accuracy": 0.9, "candidate_new_accuracy": 0.8, "n_old": 100, "n_new": 100})  # fmt: skip
    # The old champion: 40 labeled, the last 30 of which (by label time) hold 15 right.
    old_pids = log_predictions(ctx, old, [0.9] * 40)
    label(ctx, old_pids[:10], ["3"] * 10)
    label(ctx, old_pids[10:], ["3"] * 15 + ["5"] * 15)
    # The champion: 50 predictions (2 full windows + 10 waiting), confidences spread over [0.5, 1].
    conf = [0.5 + 0.5 * (i % 10) / 9 for i in range(50)]
    new_pids = log_predictions(ctx, new, conf)
    log_predictions(ctx, new, [0.99] * 30, ago=0.0)  # just made: left to settle, in no window yet

    out = jobs.accuracy(ctx)
    assert len(out["closed"]) == 2 and out["versions"] == [new, old]
    windows = ctx.store.predictions.windows(version=new)
    assert [w["n"] for w in windows] == [20, 20] and windows[1]["first_id"] == new_pids[0]
    est = windows[0]["estimates"]
    assert est["confidence"] == pytest.approx(np.mean(conf[20:40]))
    # ATC: the share above the holdout's (1 - 0.9) quantile of the kept confidences, 0.55.
    assert est["atc"] == pytest.approx(np.mean(np.asarray(conf[20:40]) > 0.55))
    assert windows[0]["flags"] == []
    assert value(ctx, "continual_estimated_accuracy_ratio", method="atc") == pytest.approx(est["atc"])
    assert value(ctx, "continual_estimate_flagged") == 0
    assert value(ctx, "continual_estimation_error_ratio", method="atc") is None  # no labels yet
    assert jobs.accuracy(ctx)["closed"] == []  # nothing new: no window twice

    # Live accuracy per version, the Wilson interval and the gate's accuracy beside it.
    assert value(ctx, "continual_live_accuracy_ratio", version=old) == pytest.approx(0.5)
    assert value(ctx, "continual_live_accuracy_count", version=old) == 30
    lo, hi = (
        value(ctx, "continual_live_accuracy_lower_ratio", version=old),
        value(ctx, "continual_live_accuracy_upper_ratio", version=old),
    )
    assert lo == pytest.approx(0.3315, abs=1e-3) and hi == pytest.approx(0.6685, abs=1e-3)
    assert value(ctx, "continual_gate_accuracy_ratio", version=old) == 0.95
    assert value(ctx, "continual_gate_accuracy_ratio", version=new) == pytest.approx(0.85)
    assert value(ctx, "continual_live_accuracy_count", version=new) == 0
    assert value(ctx, "continual_live_accuracy_ratio", version=new) is None  # no labels: no ratio

    # Labels for the newer window arrive: 12 of 20, 9 right (one a class the model lacks).
    label(ctx, new_pids[20:32], ["3"] * 9 + ["4", "4", "cat"])
    jobs.accuracy(ctx)
    w = ctx.store.predictions.windows(version=new)[0]
    assert (w["n_labeled"], w["n_correct"], w["unknown_labels"]) == (12, 9, ["cat"])
    assert value(ctx, "continual_estimation_error_ratio", method="atc") == pytest.approx(est["atc"] - 0.75)
    assert value(ctx, "continual_estimation_error_ratio", method="confidence") == pytest.approx(
        est["confidence"] - 0.75
    )
    assert value(ctx, "continual_estimate_flagged") == 1  # labels outside the classes
    status = accuracy_status(ctx.settings, ctx.store, new, pending=0)
    assert [v["version"] for v in status["versions"]] == [new, old]
    assert status["versions"][0]["n"] == 12 and status["versions"][0]["accuracy"] == 0.75
    assert status["last_window"]["realized"] == 0.75 and status["estimate"] == est["atc"]
    assert any("cat" in f for f in status["last_window"]["flags"])
    # A third version pushes the oldest out of the bounded label set ([accuracy] live_versions = 3 by default).
    third = add_version(ctx, 3, calibration=None, gate=None)
    fourth = add_version(ctx, 4, calibration=None, gate=None)
    jobs.accuracy(ctx)
    assert value(ctx, "continual_live_accuracy_count", version=fourth) == 0
    assert value(ctx, "continual_live_accuracy_count", version=third) == 0
    assert value(ctx, "continual_live_accuracy_count", version=old) is None
    assert value(ctx, "continual_estimated_accuracy_ratio", method="atc") is None  # the new champion has no window


def test_windows_are_flagged_when_drift_was_detected(tmp_path: Path) -> None:
    ctx = make_loop(tmp_path, {"accuracy": {"estimate_window": 10}})
    v = add_version(ctx, 1, calibration=CALIBRATION, gate=None)
    ctx.store.records.add_drift_check(
        champion=v, detected=True, n_reference=100, n_current=100, duration_seconds=0.1,
        results={"detectors": [{"detector": "mmd", "effect": 0.4, "detected": True},
                               {"detector": "ks", "effect": 0.05, "detected": False}]},
    )  # fmt: skip
    log_predictions(ctx, v, [0.6] * 10)
    jobs.accuracy(ctx)
    [w] = ctx.store.predictions.windows()
    assert len(w["flags"]) == 1 and w["flags"][0].startswith("drift: mmd effect 0.4")
    assert value(ctx, "continual_estimate_flagged") == 1


def test_a_low_estimate_is_recorded_once_per_window_and_asks_for_labels(tmp_path: Path) -> None:
    ctx = make_loop(tmp_path, {"accuracy": {"estimate_window": 10}, "triggers": {"min_estimated_accuracy": 0.8}})
    v = add_version(ctx, 1, calibration=CALIBRATION, gate=None)
    log_predictions(ctx, v, [0.52] * 10)  # almost all below the ATC threshold 0.55: estimate 0
    jobs.accuracy(ctx)
    for _ in range(2):
        out = jobs.check(ctx)
        assert out["run"] is None  # no labeled samples: no run
    [event] = ctx.store.records.events(kind=jobs.LOW_ESTIMATE_EVENT)
    assert event["data"]["estimate"] == 0.0 and event["data"]["labels_needed"] == 200  # min_new_samples 200
    assert "200 more labeled samples needed" in event["message"]
    assert value(ctx, "continual_labels_needed") == 200
    status = accuracy_status(ctx.settings, ctx.store, v, pending=0)
    assert status["labels_needed"] == 200 and status["estimate"] == 0.0
    # A window with a good estimate: nothing needed any more.
    log_predictions(ctx, v, [0.95] * 10, ago=30.0)
    jobs.accuracy(ctx)
    jobs.check(ctx)
    assert value(ctx, "continual_labels_needed") == 0
    assert len(ctx.store.records.events(kind=jobs.LOW_ESTIMATE_EVENT)) == 1


def test_the_retention_job_prunes_the_prediction_log(tmp_path: Path) -> None:
    ctx = make_loop(tmp_path, {"serving": {"prediction_retention_days": 1, "prediction_retention_rows": 25}})
    v = add_version(ctx, 1, calibration=None, gate=None)
    log_predictions(ctx, v, [0.9] * 10, ago=3 * 86_400)
    log_predictions(ctx, v, [0.9] * 40)
    out = jobs.retention(ctx)
    assert (out.versions, out.predictions) == ([], 10 + 15)
    assert ctx.store.predictions.count() == 25
