"""What a stored model version says about itself, and the read interface other rooms use to load one.

A :class:`Manifest` is written last into every version directory by the registry
(``continual.registry``). Training, the gate, the drift check and serving load
versions through :class:`ModelSource`, which the registry implements, so none of
them depends on how or where the files live.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from continual.config import InputSettings, ModelSettings, Settings
from continual.models.classifier import Classifier
from continual.models.zoo import mlp_hidden_of


@dataclass(frozen=True)
class Manifest:
    version: str
    architecture: str
    classes: tuple[str, ...]
    input: dict[str, Any]  # InputSettings as JSON: the version loads even after [model.input] changed
    parent: str | None
    data_cutoff: int
    created_at: str
    files: dict[str, dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return json.dumps(d, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        d = json.loads(raw)
        d["classes"] = tuple(d["classes"])
        return cls(**d)

    @property
    def input_spec(self) -> InputSettings:
        return InputSettings.model_validate(self.input)


class ModelSource(Protocol):
    """Read access to model versions (``continual.registry.Registry`` implements it)."""

    root: Path  # where the versions live: names a registry (caches keyed by version stay apart)

    def manifest(self, version: str) -> Manifest: ...

    def load_model(self, version: str, settings: Settings) -> Classifier: ...

    def load_tensors(self, version: str, name: str) -> dict[str, torch.Tensor] | None: ...


def model_settings_for(
    m: Manifest, settings: Settings, state: Mapping[str, torch.Tensor] | None = None
) -> ModelSettings:
    """The configured model settings with the version's own architecture, classes and input spec.

    With ``state``, an ``mlp``'s hidden sizes come from its weights, so a version
    still loads after ``[model] hidden`` changed.
    """
    update: dict[str, Any] = {
        "architecture": m.architecture,
        "classes": tuple(m.classes),
        "input": m.input_spec,
        "weights": "none",
    }
    if state is not None and m.architecture == "mlp":
        update["hidden"] = mlp_hidden_of(dict(state))
    return settings.model.model_copy(update=update)
