"""A worker stuck outside its training steps is killed at its hard deadline, and the run names the phase.

The worker stops itself at ``max_duration_seconds`` between steps; one that hangs while
planning, embedding, preloading or validating (``CONTINUAL_TEST_HANG_AT`` makes it hang
there, deaf to SIGTERM like a stuck C call) is ended by the service, so one hung
worker never stops all training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from looputil import make_loop
from modelutil import feed
from testkit import digit_samples

from continual.learn.run import HANG_ENV, create_run
from continual.procutil import process_alive
from continual.service import trainer

pytestmark = pytest.mark.slow

# From the launch: the worker needs a few seconds to start (imports) on a busy machine.
DEADLINE = {"max_duration_seconds": 20, "deadline_grace_seconds": 3}
# Embedding happens only with a frozen pretrained base: a tiny image model does it.
IMAGE_MODEL = {
    "architecture": "efficientnet_lite0",
    "weights": "imagenet",
    "mode": "feature_extraction",
    "input": {"kind": "image", "size": [32, 32], "channels": 3},
}


@pytest.mark.parametrize("phase", ["planning", "embedding", "preloading", "validating"])
def test_a_worker_hung_in_any_phase_is_killed_and_the_run_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    over: dict[str, object] = {"training": DEADLINE}
    if phase == "embedding":
        over["model"] = IMAGE_MODEL
    ctx = make_loop(tmp_path, over)
    if phase == "embedding":
        from continual.demo.digits import digit_images, png
        from continual.store import NewSample

        images, labels = digit_images()
        ctx.store.insert([NewSample(f"img-{i}", str(labels[i]), "image", png(images[i])) for i in range(60)])
    else:
        feed(ctx.store, digit_samples("original", stop=300))
    monkeypatch.setenv(HANG_ENV, phase)  # the worker child inherits it
    run_id = create_run(ctx.store, ctx.settings, trigger="test")

    outcome = trainer.train_and_gate(ctx, run_id)

    row = ctx.store.runs.get(run_id)
    assert outcome.status == "failed" and row["status"] == "failed", row
    assert f"phase {phase!r}" in row["error"] and "max_duration_seconds" in row["error"], row["error"]
    assert row["pid"] and not process_alive(int(row["pid"])), "the hung worker outlived its run"
    assert ctx.metrics.registry.get_sample_value("continual_training_failures_total") == 1
    ctx.store.dispose()
