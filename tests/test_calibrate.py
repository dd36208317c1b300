"""Temperature scaling (learn/calibrate.py), the label-free estimators (drift/estimate.py), and serving with both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from learnutil import fill, make_settings, run_here
from testkit import digit_arrays

from continual.demo.digits import PHASES, shift
from continual.drift.estimate import (
    atc,
    atc_threshold,
    estimate_window,
    far_share,
    mean_confidence,
    wilson_interval,
    window_flags,
)
from continual.ingest import Decoded
from continual.learn.calibrate import QUANTILES, calibration_of, confidence, fit_temperature, nll
from continual.learn.run import create_run
from continual.models.typicality import Typicality, ledoit_wolf
from continual.registry import Registry
from continual.serving import Serving
from continual.store import Store


def synthetic(n: int, scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 5-class model that is right about 70% of the time, ``scale`` times overconfident."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    z = rng.normal(size=(n, 5))
    z[np.arange(n), y] += 1.2
    return z * scale, y


def test_the_fitted_temperature_undoes_overconfidence_and_lowers_nll() -> None:
    z, y = synthetic(4_000, 1.0)
    t1 = fit_temperature(z, y)
    zs, _ = synthetic(4_000, 5.0)
    t5 = fit_temperature(zs, y)
    assert t5 == pytest.approx(5 * t1, rel=0.05)  # the same model, 5x more sure of itself
    assert nll(zs, y, t5) < 0.6 * nll(zs, y, 1.0)
    # Calibrated, the mean confidence matches the accuracy; uncalibrated it does not.
    acc = float((zs.argmax(1) == y).mean())
    assert abs(confidence(zs, t5).mean() - acc) < 0.02
    assert confidence(zs, 1.0).mean() - acc > 0.15
    # Underconfident logits get T < 1.
    assert fit_temperature(z / 4, y) < 0.5


def test_fit_temperature_is_never_worse_than_none() -> None:
    z, y = synthetic(50, 1.0, seed=3)
    t = fit_temperature(z, y)
    assert nll(z, y, t) <= nll(z, y, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        nll(z, y, 0.0)


def test_calibration_of_keeps_what_serving_and_atc_need() -> None:
    z, y = synthetic(600, 3.0)
    y_unknown = y.copy()
    y_unknown[:100] = -1  # labels the model does not have: left out of the fit
    cal = calibration_of(z, y_unknown)
    assert cal["n"] == 500 and cal["nll_after"] < cal["nll_before"]
    assert len(cal["confidence_quantiles"]) == QUANTILES and cal["confidence_quantiles"] == sorted(
        cal["confidence_quantiles"]
    )
    # ATC reproduces the holdout's own accuracy from the quantiles alone.
    conf = confidence(z[100:], cal["temperature"])
    assert atc(conf, atc_threshold(cal["confidence_quantiles"], cal["accuracy"])) == pytest.approx(
        cal["accuracy"], abs=0.01
    )
    small = calibration_of(z[:10], y[:10])
    assert small["temperature"] == 1.0 and "skipped" in small


def test_estimators_golden() -> None:
    rng = np.random.default_rng(7)
    conf = rng.uniform(0.2, 1.0, 1_000)
    assert mean_confidence(conf) == pytest.approx(0.595365, abs=1e-6)
    t = atc_threshold(conf, 0.8)
    assert t == pytest.approx(float(np.quantile(conf, 0.2)))
    assert atc(conf, t) == pytest.approx(0.8, abs=1e-3)
    plain = mean_confidence(conf[:100])
    assert estimate_window(conf[:100], None) == {
        "atc": None, "confidence": pytest.approx(plain), "atc_plain": None, "confidence_plain": plain
    }  # fmt: skip
    # Far predictions (distance > 1) count at chance; unknown distances (None) do not count as far.
    est = estimate_window([0.9, 0.9, 0.9, 0.9], {"accuracy": 0.9, "confidence_quantiles": [0.5, 0.8]},
                          [0.2, None, 5.0, 2.0], n_classes=10)  # fmt: skip
    assert est == {"atc": pytest.approx(0.55), "confidence": pytest.approx(0.5), "atc_plain": 1.0,
                   "confidence_plain": 0.9}  # fmt: skip
    assert far_share([0.2, None, 5.0, 2.0]) == 0.5 and far_share(None) is None and far_share([None]) is None
    with pytest.raises(ValueError, match="probabilities"):
        mean_confidence([1.2])
    with pytest.raises(ValueError, match="no confidences"):
        atc([], 0.5)


def test_wilson_interval_covers_and_narrows() -> None:
    lo, hi = wilson_interval(90, 100)
    assert lo < 0.9 < hi and hi - lo < 0.13
    lo2, hi2 = wilson_interval(900, 1_000)
    assert hi2 - lo2 < (hi - lo) / 3
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    # Coverage: the true accuracy 0.85 falls inside the interval ~95% of the time.
    rng = np.random.default_rng(0)
    hits = sum(lo <= 0.85 <= hi for lo, hi in (wilson_interval(int(k), 60) for k in rng.binomial(60, 0.85, 2_000)))
    assert 0.92 < hits / 2_000 < 0.98


def test_window_flags_name_what_breaks_the_estimates() -> None:
    cal = {"temperature": 1.2, "accuracy": 0.9, "confidence_quantiles": [0.5, 0.9, 1.0]}
    assert window_flags(cal) == []
    assert window_flags(None)[0].startswith("uncalibrated")
    flags = window_flags(cal, [("mmd", 0.4), ("ks", 0.3)], ["cat", "dog"])
    assert [f.split(":")[0] for f in flags] == ["drift", "drift", "labels outside the model's classes"]


def test_a_trained_candidate_is_calibrated_and_serves_calibrated_confidences(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    x, y = digit_arrays()
    settings = make_settings(tmp_path, store.url, strategy="naive", epochs=6)
    fill(store, x[:900], y[:900], "d")
    run = run_here(store, settings, create_run(store, settings, trigger="test"))
    assert run["status"] == "succeeded", run["error"]
    registry = Registry(settings.models_dir, store)
    cal = registry.manifest(run["candidate_version"]).extra["calibration"]
    assert cal["n"] == store.count(split="holdout") and cal["n"] >= 100
    assert cal["nll_after"] <= cal["nll_before"] and cal["temperature"] != 1.0
    assert run["metrics"]["temperature"] == cal["temperature"]

    serving = Serving(settings.model_copy(update={"serving": settings.serving.model_copy(update={"device": "cpu"})}))
    live = serving.build(registry, run["candidate_version"])
    assert live.temperature == cal["temperature"]
    serving.swap(live)
    inputs = [Decoded("vector", x[i].astype("<f4").tobytes()) for i in range(900, 920)]
    _, preds = serving.predict(inputs)
    with torch.inference_mode():
        logits = live.module(torch.from_numpy(x[900:920]))
    expected = torch.softmax(logits / cal["temperature"], dim=1)
    assert [p.label for p in preds] == [str(int(i)) for i in logits.argmax(1)]  # the answer itself is unchanged
    assert [p.confidence for p in preds] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)
    assert sum(preds[0].scores.values()) == pytest.approx(1.0, abs=1e-5)
    # The drift reservoir keeps the uncalibrated confidences the drift check compares with.
    raw = torch.softmax(logits, dim=1).max(1).values.numpy()
    assert np.allclose(serving.reservoir_snapshot().confidence[-20:], raw, atol=1e-5)

    # Each prediction says how far it is from the holdout: digits like the training data are near,
    # inverted and transposed ones (confidently misclassified) are far.
    assert live.typicality is not None and cal["typicality"]["threshold"] == pytest.approx(live.typicality.threshold)
    images = x[900:1100].reshape(-1, 8, 8)
    far = {}
    for phase in PHASES:
        shifted = shift(images, phase).reshape(len(images), -1)
        _, preds = serving.predict([Decoded("vector", v.astype("<f4").tobytes()) for v in shifted])
        far[phase] = float(np.mean([p.distance > 1 for p in preds]))
    assert far["original"] < 0.1 and far["inverted"] > 0.9 and far["transposed"] > 0.5, far
    store.dispose()


def test_typicality_fits_stores_and_scores() -> None:
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 30)) @ rng.normal(size=(30, 30))
    assert np.allclose(ledoit_wolf(x), LedoitWolf().fit(x).covariance_)
    emb = rng.normal(size=(500, 20))
    labels = rng.integers(0, 3, 500)
    emb += labels[:, None] * 2.0
    t = Typicality.fit(emb, labels, dims=10)
    fresh = rng.normal(size=(2_000, 20)) + rng.integers(0, 3, 2_000)[:, None] * 2.0
    assert 0.0 < np.mean(t.ratio(fresh) > 1) < 0.04  # the out-of-fold 99th percentile holds on new data
    assert np.all(t.ratio(fresh + 6.0) > 1)
    back = Typicality.from_tensors(t.tensors())
    assert np.allclose(back.ratio(fresh[:50]), t.ratio(fresh[:50]), rtol=1e-4)
    with pytest.raises(ValueError, match="at least"):
        Typicality.fit(emb[:5], labels[:5])
