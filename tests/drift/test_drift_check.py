"""run_check against a real store, a real registry and a real Serving: windows, detectors, row, metrics, cache."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from looputil import write_config
from modelutil import feed, import_champion
from prometheus_client import CollectorRegistry
from testkit import digit_samples

from continual.config import load_settings
from continual.drift.check import DriftDecision, run_check
from continual.drift.windows import EmbeddingCache
from continual.ingest.decode import Decoded
from continual.metrics import Metrics
from continual.models.features import FeatureCache, backbone_hash, embed_rows
from continual.registry import Registry
from continual.service.jobs import mirror_drift
from continual.serving import Serving
from continual.store import Store


class Env:
    def __init__(self, tmp_path: Path, store: Store, over: dict[str, Any] | None = None) -> None:
        self.settings = load_settings(write_config(tmp_path, over), env={})
        self.store = store
        self.metrics = Metrics(CollectorRegistry())
        self.registry = Registry(tmp_path / "models", store, on_refused=self.metrics.model_refused)
        self.cache = EmbeddingCache()

    def champion(self, cutoff: int) -> str:
        return import_champion(self.registry, self.settings, cutoff)

    def check(self, champion: str, serving: Serving | None = None) -> DriftDecision:
        """The service's check (run_check, then the metrics mirror), as the check job runs it."""
        d = run_check(
            self.settings,
            self.store,
            self.registry,
            champion=champion,
            cache=self.cache,
            live=serving.live if serving is not None else None,
            predictions=serving.reservoir_snapshot() if serving is not None else None,
        )
        if d.check_id is not None:
            mirror_drift(self.metrics, d)
        return d

    def gauge(self, name: str, detector: str | None = None) -> float | None:
        labels = {"detector": detector} if detector else {}
        return self.metrics.registry.get_sample_value(f"continual_{name}", labels)


def rows(store: Store) -> list[dict[str, Any]]:
    return store.records.drift_checks()


def test_inverted_digits_are_drift_and_the_row_and_metrics_say_so(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digit_samples("original", stop=600))
    champion = env.champion(store.max_seq())
    feed(store, digit_samples("inverted", start=600, stop=1000))

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
    data = digit_samples("original")
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
    feed(store, digit_samples("original", stop=300))
    champion = env.champion(store.max_seq())
    feed(store, digit_samples("inverted", start=300, stop=330))  # 30 < min_samples 50

    d = env.check(champion)
    assert not d.detected and d.results == [] and d.check_id is None
    assert d.n_reference == 300 and d.n_current == 30
    assert "too few samples" in d.reasons[0]
    assert rows(store) == []
    assert env.gauge("drift_checks_total") == 0 and env.gauge("drift_detected", "mmd") is None
    assert env.cache.computed == 0  # nothing was embedded for a check that could not run


def test_a_second_check_embeds_only_the_new_samples(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digit_samples("original", stop=400))
    champion = env.champion(store.max_seq())
    feed(store, digit_samples("original", start=400, stop=500))
    env.check(champion)
    assert (env.cache.computed, env.cache.hits) == (500, 0)

    env.check(champion)  # nothing new: every embedding is a cache hit
    assert (env.cache.computed, env.cache.hits) == (500, 500)

    feed(store, digit_samples("original", start=500, stop=520))
    d = env.check(champion)
    assert env.cache.computed == 520  # only the 20 new samples went through the model
    assert d.n_current == 120 and len(rows(store)) == 3


def test_prediction_shift_from_the_serving_reservoir_before_any_labels(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digit_samples("original", stop=800))
    champion = env.champion(store.max_seq())
    serving = Serving(env.settings, events=env.metrics)
    assert serving.sync(env.registry)

    # Same-distribution traffic first: no alarm. No new feedback at all, so only this detector runs.
    same = digit_samples("original", start=800, stop=1100)
    serving.predict([Decoded("vector", np.asarray(s["x"], "<f4").tobytes()) for s in same])
    d = env.check(champion, serving)
    assert [r.detector for r in d.results] == ["prediction_shift"], d.reasons
    assert not d.detected, d.reasons
    assert d.n_current == 300 and "current window has 0 samples" in d.skipped["mmd"]

    # Then inverted strokes arrive at /v1/predict, still without a single label.
    shifted = digit_samples("inverted", start=1100, stop=1500)
    stored = store.count()
    serving.predict([Decoded("vector", np.asarray(s["x"], "<f4").tobytes()) for s in shifted])
    d = env.check(champion, serving)
    assert d.detected and d.results[0].detected, d.reasons
    assert store.count() == stored  # predicting stored no samples: no feedback for any of it
    row = rows(store)[-1]
    [pred] = [r for r in row["results"]["detectors"] if r["detector"] == "prediction_shift"]
    assert pred["detected"] is True and pred["p_value"] < 0.01 and math.isfinite(pred["effect"])
    assert env.gauge("drift_detected", "prediction_shift") == 1


def test_reservoir_of_another_version_is_not_used(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digit_samples("original", stop=400))
    first = env.champion(store.max_seq())
    serving = Serving(env.settings, events=env.metrics)
    serving.sync(env.registry)
    serving.predict(
        [Decoded("vector", np.asarray(s["x"], "<f4").tobytes()) for s in digit_samples("inverted", stop=200)]
    )
    second = env.champion(store.max_seq())  # promoted, but serving has not followed yet
    d = env.check(second, serving)
    assert d.results == [] and "too few samples" in d.reasons[0]
    assert first in d.skipped["prediction_shift"] and "not the champion" in d.skipped["prediction_shift"]


def test_a_new_champion_with_the_same_frozen_base_reuses_its_embeddings(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digit_samples("original", stop=400))
    first = env.champion(store.max_seq())
    feed(store, digit_samples("original", start=400, stop=500))
    env.check(first)
    assert env.cache.computed == 500

    # Same backbone weights (feature_extraction only retrains the head), a later cutoff.
    second = env.champion(450)
    d = env.check(second)
    assert env.cache.computed == 500 and d.n_current == 50  # every embedding came from the cache


def test_the_training_workers_feature_cache_seeds_the_first_check(tmp_path: Path, store: Store) -> None:
    env = Env(tmp_path, store)
    feed(store, digit_samples("original", stop=400))
    champion = env.champion(store.max_seq())
    # What a feature_extraction run leaves behind: the frozen base's features of the old
    # samples, saved by the learn FeatureCache under the backbone's hash.
    model = env.registry.load_model(champion, env.settings)
    disk = FeatureCache(backbone_hash(model), 10_000, env.settings.service.data_dir / "cache" / "features")
    embed_rows(model, store.get_samples(store.draw(400, split=None)), spec=env.settings.model.input, cache=disk)
    disk.save()
    feed(store, digit_samples("inverted", start=400, stop=500))

    d = env.check(champion)
    assert d.detected and d.n_reference == 400
    assert env.cache.computed == 100  # only the new samples went through the model
