"""run_check against a real store, a real registry and a real Serving: windows, detectors, row, metrics, cache."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from looputil import digits, write_config
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from continual.config import Settings, load_settings
from continual.drift.check import DriftDecision, run_check
from continual.drift.windows import EmbeddingCache
from continual.ingest.decode import Decoded
from continual.learn.features import FeatureCache, backbone_hash, embed_samples
from continual.metrics import Metrics
from continual.models import build_model
from continual.registry import Registry
from continual.serving import Serving
from continual.store import NewSample, Store
from continual.store.engine import read_tx
from continual.store.schema import drift_checks


def feed(store: Store, samples: list[dict[str, Any]]) -> None:
    store.insert([NewSample(s["id"], s["label"], "vector", np.asarray(s["x"], np.float32).tobytes()) for s in samples])


_FITTED: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}


def trained_state(settings: Settings) -> dict[str, torch.Tensor]:
    """A tiny MLP fitted on the original digits (full batch), once per session and hidden size."""
    hidden = tuple(settings.model.hidden)
    if hidden not in _FITTED:
        _FITTED[hidden] = _fit(settings)
    return {k: v.clone() for k, v in _FITTED[hidden].items()}


def _fit(settings: Settings) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(settings.model)
    data = digits("original")
    x = torch.tensor([s["x"] for s in data])
    y = torch.tensor([int(s["label"]) for s in data])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval().state_dict()


class Env:
    def __init__(self, tmp_path: Path, store: Store, over: dict[str, Any] | None = None) -> None:
        self.settings = load_settings(write_config(tmp_path, over), env={})
        self.store = store
        self.metrics = Metrics(CollectorRegistry())
        self.registry = Registry(tmp_path / "models", store, self.metrics)
        self.cache = EmbeddingCache()

    def champion(self, cutoff: int) -> str:
        m = self.registry.write_version(
            trained_state(self.settings),
            architecture="mlp",
            classes=self.settings.model.classes,
            input_spec=self.settings.model.input.model_dump(mode="json"),
            parent=None,
            data_cutoff=cutoff,
        )
        self.registry.promote(m.version, reason="import")
        return m.version

    def check(self, champion: str, serving: Serving | None = None) -> DriftDecision:
        return run_check(
            self.settings,
            self.store,
            self.registry,
            self.metrics,
            serving=serving,
            champion=champion,
            cache=self.cache,
        )

    def gauge(self, name: str, detector: str | None = None) -> float | None:
        labels = {"detector": detector} if detector else {}
        return self.metrics.registry.get_sample_value(f"continual_{name}", labels)


def rows(store: Store) -> list[dict[str, Any]]:
    with read_tx(store.engine) as conn:
        return [dict(r._mapping) for r in conn.execute(select(drift_checks).order_by(drift_checks.c.id))]


def test_inverted_digits_are_drift_and_the_row_and_metrics_say_so(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digits("original", stop=600))
    champion = env.champion(store.max_seq())
    feed(store, digits("inverted", start=600, stop=1000))

    d = env.check(champion)
    assert d.detected and d.check_id is not None
    by_name = {r.detector: r for r in d.results}
    assert set(by_name) == {"mmd", "ks", "label_shift"}
    assert by_name["mmd"].detected and by_name["ks"].detected
    assert d.n_reference == 500 and d.n_current == 400  # window 500 caps the reference
    assert d.skipped == {"prediction_shift": d.skipped["prediction_shift"]}
    assert "no serving process" in d.skipped["prediction_shift"]

    [row] = rows(store)
    assert row["id"] == d.check_id and row["detected"] is True and row["champion"] == champion
    assert (row["n_reference"], row["n_current"]) == (500, 400)
    dets = {r["detector"]: r for r in row["results"]["detectors"]}
    assert set(dets) == {"mmd", "ks", "label_shift", "prediction_shift"}
    assert dets["mmd"]["detected"] is True and dets["mmd"]["p_value"] < 0.01 and dets["mmd"]["effect"] > 0.02
    assert dets["prediction_shift"]["p_value"] is None and dets["prediction_shift"]["skipped"]
    assert any(r.startswith("mmd: drift") for r in row["results"]["reasons"])
    json.dumps(row["results"], allow_nan=False)  # strict JSON: no NaN anywhere
    json.dumps(d.to_dict(), allow_nan=False)

    assert env.gauge("drift_detected", "mmd") == 1
    assert env.gauge("drift_score", "mmd") == pytest.approx(by_name["mmd"].effect)
    assert env.gauge("drift_p_value", "ks") == pytest.approx(by_name["ks"].p_value)
    assert env.gauge("drift_detected", "prediction_shift") == 0
    assert env.gauge("drift_checks_total") == 1
    assert env.gauge("last_drift_check_timestamp_seconds") > 0


def test_same_distribution_halves_are_not_drift(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    # A shuffled split of the same digits: old and new come from one distribution.
    data = digits("original")
    order = np.random.default_rng(1).permutation(len(data))
    feed(store, [data[i] for i in order[:900]])
    champion = env.champion(store.max_seq())
    feed(store, [data[i] for i in order[900:]])

    d = env.check(champion)
    assert not d.detected, d.reasons
    assert {r.detector for r in d.results} == {"mmd", "ks", "label_shift"}
    assert all(not r.detected for r in d.results)
    assert env.gauge("drift_detected", "mmd") == 0 and env.gauge("drift_checks_total") == 1
    assert rows(store)[0]["detected"] is False


def test_too_few_samples_checks_nothing_and_writes_nothing(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digits("original", stop=300))
    champion = env.champion(store.max_seq())
    feed(store, digits("inverted", start=300, stop=330))  # 30 < min_samples 50

    d = env.check(champion)
    assert not d.detected and d.results == [] and d.check_id is None
    assert d.n_reference == 300 and d.n_current == 30
    assert "too few samples" in d.reasons[0]
    assert rows(store) == []
    assert env.gauge("drift_checks_total") == 0 and env.gauge("drift_detected", "mmd") is None
    assert env.cache.computed == 0  # nothing was embedded for a check that could not run


def test_a_second_check_embeds_only_the_new_samples(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digits("original", stop=400))
    champion = env.champion(store.max_seq())
    feed(store, digits("original", start=400, stop=500))
    env.check(champion)
    assert (env.cache.computed, env.cache.hits) == (500, 0)

    env.check(champion)  # nothing new: every embedding is a cache hit
    assert (env.cache.computed, env.cache.hits) == (500, 500)

    feed(store, digits("original", start=500, stop=520))
    d = env.check(champion)
    assert env.cache.computed == 520  # only the 20 new samples went through the model
    assert d.n_current == 120 and len(rows(store)) == 3


def test_prediction_shift_from_the_serving_reservoir_before_any_labels(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digits("original", stop=800))
    champion = env.champion(store.max_seq())
    serving = Serving(env.settings, env.metrics)
    assert serving.sync(env.registry)

    # Same-distribution traffic first: no alarm. No new feedback at all, so only this detector runs.
    same = digits("original", start=800, stop=1100)
    serving.predict([Decoded("vector", np.asarray(s["x"], "<f4").tobytes()) for s in same])
    d = env.check(champion, serving)
    assert [r.detector for r in d.results] == ["prediction_shift"], d.reasons
    assert not d.detected, d.reasons
    assert d.n_current == 300 and "current window has 0 samples" in d.skipped["mmd"]

    # Then inverted strokes arrive at /v1/predict, still without a single label.
    shifted = digits("inverted", start=1100, stop=1500)
    serving.predict([Decoded("vector", np.asarray(s["x"], "<f4").tobytes()) for s in shifted])
    d = env.check(champion, serving)
    assert d.detected and d.results[0].detected, d.reasons
    assert store.count(after=store.max_seq() - 0) == 0  # no feedback was stored for any of it
    row = rows(store)[-1]
    [pred] = [r for r in row["results"]["detectors"] if r["detector"] == "prediction_shift"]
    assert pred["detected"] is True and pred["p_value"] < 0.01 and math.isfinite(pred["effect"])
    assert env.gauge("drift_detected", "prediction_shift") == 1


def test_reservoir_of_another_version_is_not_used(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digits("original", stop=400))
    first = env.champion(store.max_seq())
    serving = Serving(env.settings, env.metrics)
    serving.sync(env.registry)
    serving.predict([Decoded("vector", np.asarray(s["x"], "<f4").tobytes()) for s in digits("inverted", stop=200)])
    second = env.champion(store.max_seq())  # promoted, but serving has not followed yet
    d = env.check(second, serving)
    assert d.results == [] and "too few samples" in d.reasons[0]
    assert first in d.skipped["prediction_shift"] and "not the champion" in d.skipped["prediction_shift"]


def test_a_new_champion_with_the_same_frozen_base_reuses_its_embeddings(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digits("original", stop=400))
    first = env.champion(store.max_seq())
    feed(store, digits("original", start=400, stop=500))
    env.check(first)
    assert env.cache.computed == 500

    # Same backbone weights (feature_extraction only retrains the head), a later cutoff.
    second = env.champion(450)
    d = env.check(second)
    assert env.cache.computed == 500 and d.n_current == 50  # every embedding came from the cache


def test_the_training_workers_feature_cache_seeds_the_first_check(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digits("original", stop=400))
    champion = env.champion(store.max_seq())
    # What a feature_extraction run leaves behind: the frozen base's features of the old
    # samples, saved by the learn FeatureCache under the backbone's hash.
    model = env.registry.load_model(champion, env.settings)
    disk = FeatureCache(backbone_hash(model), 10_000, env.settings.service.data_dir / "cache" / "features")
    embed_samples(model, store.draw(400, split=None), spec=env.settings.model.input, store=store, cache=disk)
    disk.save()
    feed(store, digits("inverted", start=400, stop=500))

    d = env.check(champion)
    assert d.detected and d.n_reference == 400
    assert env.cache.computed == 100  # only the new samples went through the model
