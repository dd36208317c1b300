"""A fitted tiny champion on the digits, and vector feedback straight into a store."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from testkit import digit_samples

from continual.config import Settings
from continual.models import Classifier, build_model
from continual.registry import Registry
from continual.store import NewSample, Store


def feed(store: Store, samples: list[dict[str, Any]]) -> None:
    store.insert([NewSample(s["id"], s["label"], "vector", np.asarray(s["x"], np.float32).tobytes()) for s in samples])


_FITTED: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}


def trained_model(settings: Settings) -> Classifier:
    """A tiny MLP fitted on the original digits (full batch), once per session and hidden size."""
    hidden = tuple(settings.model.hidden)
    if hidden not in _FITTED:
        _FITTED[hidden] = _fit(settings)
    model = build_model(settings.model)
    model.load_state_dict({k: v.clone() for k, v in _FITTED[hidden].items()})
    return model.eval()


def import_champion(registry: Registry, settings: Settings, cutoff: int) -> str:
    """The fitted MLP registered as champion with data cutoff ``cutoff`` (what ``continual models import`` does)."""
    m = registry.import_model(
        trained_model(settings), input_spec=settings.model.input.model_dump(mode="json"), data_cutoff=cutoff
    )
    return m.version


def _fit(settings: Settings) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(settings.model)
    data = digit_samples("original")
    x = torch.tensor([s["x"] for s in data])
    y = torch.tensor([int(s["label"]) for s in data])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval().state_dict()
