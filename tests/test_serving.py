from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from continual.config import InputSettings, ModelSettings, Settings
from continual.ingest import Decoded
from continual.metrics import Metrics
from continual.models import build_model
from continual.registry import Registry
from continual.serving import NoModel, Reservoir, Serving

SETTINGS = Settings(
    model=ModelSettings(
        architecture="mlp",
        weights="none",
        classes=("a", "b", "c"),
        hidden=(8,),
        input=InputSettings(kind="vector", shape=(4,)),
    ),
    serving={"device": "cpu"},  # type: ignore[arg-type]
    drift={"reservoir_size": 10},  # type: ignore[arg-type]
)


def vec(*xs: float) -> Decoded:
    return Decoded("vector", np.asarray(xs, dtype="<f4").tobytes())


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def reg(store, tmp_path: Path, metrics: Metrics) -> Registry:  # type: ignore[no-untyped-def]
    return Registry(tmp_path / "models", store, on_refused=metrics.model_refused)


def new_version(reg: Registry, seed: int) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(SETTINGS.model).eval()
    m = reg.import_model(model, input_spec=SETTINGS.model.input.model_dump(mode="json"), promote=False)
    return m.version, model


def test_no_model_until_a_champion_exists(reg: Registry, metrics: Metrics) -> None:
    serving = Serving(SETTINGS, events=metrics)
    assert not serving.loaded() and serving.sync(reg) is False
    with pytest.raises(NoModel):
        serving.predict([vec(1, 2, 3, 4)])


def test_predictions_match_the_champion_and_follow_the_pointer(reg: Registry, metrics: Metrics) -> None:
    a, model_a = new_version(reg, 1)
    b, model_b = new_version(reg, 2)
    serving = Serving(SETTINGS, events=metrics)
    reg.promote(a, expected=reg.store.versions.champion_version(), reason="import")
    assert serving.sync(reg) is True and serving.version() == a
    assert serving.sync(reg) is False  # pointer did not move
    assert metrics.registry.get_sample_value("continual_model_info", {"version": a, "architecture": "mlp"}) == 1

    x = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 1.0, -2.0, 1.0]])
    version, preds = serving.predict([vec(*row.tolist()) for row in x])
    with torch.no_grad():
        expected = torch.softmax(model_a(x), dim=1)
    assert version == a
    for p, row in zip(preds, expected, strict=True):
        assert p.scores == pytest.approx(dict(zip(("a", "b", "c"), row.tolist(), strict=True)), abs=1e-6)
        assert p.label == ("a", "b", "c")[int(row.argmax())] and p.confidence == pytest.approx(float(row.max()))
        assert sum(p.scores.values()) == pytest.approx(1.0)

    reg.promote(b, expected=reg.store.versions.champion_version(), reason="manual")
    assert serving.sync(reg) is True
    version, preds = serving.predict([vec(*x[0].tolist())])
    with torch.no_grad():
        assert version == b and preds[0].confidence == pytest.approx(float(torch.softmax(model_b(x[:1]), 1).max()))
    assert metrics.registry.get_sample_value("continual_model_info", {"version": a, "architecture": "mlp"}) is None


def test_a_corrupt_champion_is_never_swapped_in(reg: Registry, metrics: Metrics) -> None:
    a, _ = new_version(reg, 1)
    b, _ = new_version(reg, 2)
    serving = Serving(SETTINGS, events=metrics)
    reg.promote(a, expected=reg.store.versions.champion_version(), reason="import")
    serving.sync(reg)
    reg.promote(b, expected=reg.store.versions.champion_version(), reason="gate")
    path = reg.root / b / "weights.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert serving.sync(reg) is False
    assert serving.version() == a and serving.predict([vec(1, 1, 1, 1)])[0] == a
    assert metrics.registry.get_sample_value("continual_model_load_failures_total") == 1
    serving.sync(reg)  # refused once per version, not on every poll
    assert metrics.registry.get_sample_value("continual_model_load_failures_total") == 1
    reg.rollback()
    assert serving.sync(reg) is False and serving.version() == a  # already serving the rolled-back version


def test_requests_in_flight_keep_the_model_they_started_with(reg: Registry, metrics: Metrics) -> None:
    a, _ = new_version(reg, 1)
    b, _ = new_version(reg, 2)
    serving = Serving(SETTINGS, events=metrics)
    reg.promote(a, expected=reg.store.versions.champion_version(), reason="import")
    serving.sync(reg)
    live = serving.live
    reg.promote(b, expected=reg.store.versions.champion_version(), reason="gate")
    serving.sync(reg)
    assert serving.predict([vec(0, 0, 0, 1)], live=live)[0] == a
    assert serving.predict([vec(0, 0, 0, 1)])[0] == b


def test_concurrent_predicts_during_swaps_always_answer(reg: Registry, metrics: Metrics) -> None:
    versions = [new_version(reg, i)[0] for i in range(2)]
    serving = Serving(SETTINGS, events=metrics)
    reg.promote(versions[0], expected=reg.store.versions.champion_version(), reason="import")
    serving.sync(reg)
    stop, seen, errors = threading.Event(), set(), []

    def client() -> None:
        while not stop.is_set():
            try:
                seen.add(serving.predict([vec(1, 2, 3, 4)] * 3)[0])
            except Exception as e:  # any error fails the test below
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(10):
        reg.promote(versions[(i + 1) % 2], expected=reg.store.versions.champion_version(), reason="manual")
        serving.sync(reg)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and seen <= set(versions)


def test_the_reservoir_keeps_recent_embeddings_of_the_serving_model(reg: Registry, metrics: Metrics) -> None:
    a, model_a = new_version(reg, 1)
    b, _ = new_version(reg, 2)
    serving = Serving(SETTINGS, events=metrics)
    reg.promote(a, expected=reg.store.versions.champion_version(), reason="import")
    serving.sync(reg)
    inputs = [vec(float(i), 0, 0, 1) for i in range(14)]
    serving.predict(inputs[:6])
    serving.predict(inputs[6:])
    snap = serving.reservoir_snapshot()
    emb, pred, conf, version = snap.embeddings, snap.predicted, snap.confidence, snap.version
    assert version == a and emb.shape == (10, 8) and pred.shape == conf.shape == (10,)
    x = torch.tensor([[float(i), 0, 0, 1] for i in range(4, 14)])
    with torch.no_grad():
        assert np.allclose(emb, model_a.embed(x).numpy(), atol=1e-6)  # the newest 10, oldest first
        assert (pred == model_a(x).argmax(1).numpy()).all()
    reg.promote(b, expected=reg.store.versions.champion_version(), reason="gate")
    serving.sync(reg)
    serving.predict(inputs[:2])
    snap = serving.reservoir_snapshot()
    assert snap.version == b and len(snap.embeddings) == 2  # the old model's embedding space is dropped


def test_reservoir_wraps_around_in_one_large_batch() -> None:
    r = Reservoir(3)
    r.add("v", np.arange(7, dtype=np.float32).reshape(7, 1), np.arange(7), np.ones(7))
    snap = r.snapshot()
    assert snap.embeddings[:, 0].tolist() == [4, 5, 6] and snap.predicted.tolist() == [4, 5, 6]
    with pytest.raises(ValueError):
        Reservoir(0)
