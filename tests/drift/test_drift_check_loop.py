"""The check job's tick with a real drift check: shifted new samples start a run whose trigger says drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from looputil import make_loop
from modelutil import feed, import_champion
from testkit import digit_samples

from continual.service import jobs


@pytest.mark.slow
def test_drift_triggers_a_run(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, {"training": {"epochs": 1}})
    settings, store, registry, metrics = loop.settings, loop.store, loop.registry, loop.metrics
    feed(store, digit_samples("original", stop=900))
    champion = import_champion(registry, settings, store.max_seq())
    # 300 inverted digits: >= min_new_samples (200), far below max_new_samples.
    feed(store, digit_samples("inverted", start=900, stop=1200))

    out = jobs.check(loop)

    assert out["drift"] is True and out["run"] is not None, out
    check = store.records.last_drift_check()
    assert check is not None
    assert check["detected"] and check["champion"] == champion and check["n_current"] == 300, check
    run = store.runs.get(out["run"])
    assert "drift" in run["trigger"], run["trigger"]
    assert metrics.registry.get_sample_value("continual_drift_detected", {"detector": "mmd"}) == 1
    store.dispose()
