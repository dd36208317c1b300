"""The daemon's tick with a real drift check: shifted new samples start a run whose trigger says drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from looputil import digits, make_loop
from sqlalchemy import select
from test_drift_check import feed, trained_state

from continual import daemon
from continual.learn import runs
from continual.store.engine import read_tx
from continual.store.schema import drift_checks


@pytest.mark.slow
def test_drift_triggers_a_run(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, {"training": {"epochs": 1}})
    settings, store, registry, metrics = loop.settings, loop.store, loop.registry, loop.metrics
    feed(store, digits("original", stop=900))
    champion = registry.write_version(
        trained_state(settings),
        architecture="mlp",
        classes=settings.model.classes,
        input_spec=settings.model.input.model_dump(mode="json"),
        parent=None,
        data_cutoff=store.max_seq(),
    ).version
    registry.promote(champion, reason="import")
    # 300 inverted digits: >= min_new_samples (200), far below max_new_samples.
    feed(store, digits("inverted", start=900, stop=1200))

    out = daemon.check(loop)

    assert out["drift"] is True and out["run"] is not None, out
    with read_tx(store.engine) as conn:
        check = conn.execute(select(drift_checks).order_by(drift_checks.c.id.desc()).limit(1)).one()
    assert check.detected and check.champion == champion and check.n_current == 300, check
    run = runs.get_run(store, out["run"])
    assert "drift" in run["trigger"], run["trigger"]
    assert metrics.registry.get_sample_value("continual_drift_detected", {"detector": "mmd"}) == 1
    store.dispose()
