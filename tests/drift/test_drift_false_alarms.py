"""No drift, no alarm: 50 seeded same-distribution checks through the real ``run_check``.

Each trial is a fresh store (old feedback, the fitted champion with that cutoff, new
feedback) and a real ``Serving`` that predicted same-distribution traffic, so all four
detectors run — mmd, ks, label and prediction shift — and so does the combined decision
(drift when any detector fires).

The bound: a detector reports drift only when ``p < alpha`` *and* ``effect >=
min_effect``; with a valid p-value the first alone happens with probability at most
``alpha`` under no drift, and the effect floor can only remove alarms, never add them.
So each detector's false-alarm rate is at most ``alpha``, and the combined decision's
at most ``4 · alpha`` (union bound over the four detectors, whatever their dependence).
The test fails when the observed count would be improbable (< 0.1 %, exact binomial
tail) at those rates: more than 4 of 50 alarms for one detector, or more than 7 of 50
for the combined decision, at alpha = 0.01.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from looputil import write_config
from modelutil import feed, import_champion
from scipy.stats import binom
from testkit import digit_samples

from continual.config import load_settings
from continual.drift.check import DETECTOR_NAMES, run_check
from continual.drift.windows import EmbeddingCache
from continual.ingest.decode import Decoded
from continual.registry import Registry
from continual.serving import Serving
from continual.store import Store

TRIALS, WINDOW = 50, 100
DRIFT = {"window": WINDOW, "min_samples": 50, "permutations": 100, "alpha": 0.01}


@pytest.mark.slow
def test_no_drift_false_alarm_rate_of_each_detector_and_the_combined_decision(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, {"drift": DRIFT}), env={})
    d = settings.drift
    template = tmp_path / "template.db"
    store = Store(f"sqlite:///{template}")
    store.upgrade()
    store.dispose()
    data = digit_samples("original")
    names = [DETECTOR_NAMES[k] for k in d.detectors]
    alarms = dict.fromkeys(names, 0)
    combined = 0
    torch.set_num_threads(1)  # many tiny checks: a second thread only waits on a shared 2-core box
    for trial in range(TRIALS):
        # Old feedback, new feedback and predict traffic: three disjoint random draws from one distribution.
        order = np.random.default_rng(trial).permutation(len(data))
        old, new, traffic = (
            [data[i] for i in order[k * WINDOW : (k + 1) * WINDOW]] for k in range(3)
        )  # fmt: skip
        trial_dir = tmp_path / f"t{trial}"
        trial_dir.mkdir()
        shutil.copy(template, trial_dir / "store.db")
        store = Store(f"sqlite:///{trial_dir / 'store.db'}")
        try:
            registry = Registry(trial_dir / "models", store)
            feed(store, old)
            champion = import_champion(registry, settings, store.max_seq())
            feed(store, new)
            serving = Serving(settings)
            assert serving.sync(registry)
            serving.predict([Decoded("vector", np.asarray(s["x"], "<f4").tobytes()) for s in traffic])
            decision = run_check(
                settings, store, registry, champion=champion, cache=EmbeddingCache(),
                live=serving.live, predictions=serving.reservoir_snapshot(), record=False,
            )  # fmt: skip
        finally:
            store.dispose()
        assert decision.skipped == {} and sorted(r.detector for r in decision.results) == sorted(names), decision
        assert (decision.n_reference, decision.n_current) == (WINDOW, WINDOW)
        for r in decision.results:
            alarms[r.detector] += r.detected
        combined += decision.detected
        assert decision.detected == any(r.detected for r in decision.results)

    one = int(binom.ppf(0.999, TRIALS, d.alpha))
    any_ = int(binom.ppf(0.999, TRIALS, min(1.0, len(names) * d.alpha)))
    print(f"\nno-drift alarms in {TRIALS} checks: {alarms}, combined {combined} (limits {one} each, {any_} combined)")
    assert (one, any_) == (4, 7)
    assert all(n <= one for n in alarms.values()), f"false alarms per detector {alarms}, more than {one} of {TRIALS}"
    assert combined <= any_, f"{combined} of {TRIALS} same-distribution checks raised drift (limit {any_}): {alarms}"
