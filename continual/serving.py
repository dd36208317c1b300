"""The live model: one immutable object behind one reference, hot-swapped, following the champion pointer.

Requests read ``Serving.live`` once and use that object to the end, so a swap
never changes the model under a request in flight, and the read path takes no
lock. A swap builds and warms up the new :class:`LiveModel` first, then replaces
the reference (an atomic attribute store). The service's ``sync_champion`` job
(:mod:`continual.service.jobs`) calls :meth:`Serving.sync` every
``serving.poll_interval_seconds``, so every process follows the pointer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from continual.config import InputSettings, Settings
from continual.models import Classifier, ModelError, input_shape, make_transform
from continual.models.device import resolve_device
from continual.models.manifest import model_settings_for
from continual.models.transforms import DecodedLike
from continual.registry import ChecksumMismatch, Registry, VersionNotFound
from continual.store import StoreUnavailable

log = logging.getLogger("continual.serving")


class NoModel(RuntimeError):
    """No champion has been loaded yet."""


class ServingEvents(Protocol):
    """What serving reports as it happens (``continual.metrics.Metrics`` mirrors it)."""

    def model_swapped(self, version: str, architecture: str) -> None: ...

    def model_refused(self, version: str) -> None: ...


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    scores: dict[str, float]


@dataclass(frozen=True)
class LiveModel:
    """One loaded version; never mutated after it is built."""

    version: str
    architecture: str
    module: Classifier  # eval mode, on ``device``
    transform: Callable[[DecodedLike], torch.Tensor]
    classes: tuple[str, ...]
    input: InputSettings
    device: torch.device

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, probabilities): the backbone runs once, the head on its output."""
        emb = self.module.backbone(batch.to(self.device, non_blocking=True))
        return emb, torch.softmax(self.module.head(emb).float(), dim=1)


@dataclass(frozen=True)
class ReservoirSnapshot:
    """Recent predictions, oldest first: embeddings ``[n, D]``, predicted class indices, confidences."""

    embeddings: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    version: str | None


class Reservoir:
    """The newest ``size`` request embeddings with predicted class and confidence (never raw inputs)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._lock = threading.Lock()
        self._reset(None, 0)

    def _reset(self, version: str | None, dim: int) -> None:
        self.version = version
        self._emb = np.zeros((self.size, dim), dtype=np.float32)
        self._pred = np.zeros(self.size, dtype=np.int64)
        self._conf = np.zeros(self.size, dtype=np.float32)
        self._n = 0  # total ever added for this version

    def add(self, version: str, emb: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> None:
        with self._lock:
            if version != self.version or emb.shape[1] != self._emb.shape[1]:
                # A new model embeds into a different space: old rows no longer compare.
                self._reset(version, emb.shape[1])
            for start in range(0, len(emb), self.size):
                e, p, c = (
                    emb[start : start + self.size],
                    pred[start : start + self.size],
                    conf[start : start + self.size],
                )
                idx = (self._n + np.arange(len(e))) % self.size
                self._emb[idx], self._pred[idx], self._conf[idx] = e, p, c
                self._n += len(e)

    def snapshot(self) -> ReservoirSnapshot:
        with self._lock:
            n = min(self._n, self.size)
            # Oldest first.
            order = (np.arange(n) + (self._n - n)) % self.size
            return ReservoirSnapshot(
                self._emb[order].copy(), self._pred[order].copy(), self._conf[order].copy(), self.version
            )


class Serving:
    """Holds the live model, predicts with it, and follows the champion pointer."""

    def __init__(self, settings: Settings, events: ServingEvents | None = None) -> None:
        self.settings = settings
        self.events = events
        self.device = resolve_device(settings.serving.device)
        self.max_batch = settings.serving.max_batch
        self._live: LiveModel | None = None
        self._failed: str | None = None  # a version refused at load; not retried until the pointer moves
        self._swap_lock = threading.Lock()  # serialises loads; predict never takes it
        self._reservoir = Reservoir(settings.drift.reservoir_size)

    # -- the read path ----------------------------------------------------------
    @property
    def live(self) -> LiveModel | None:
        return self._live

    def loaded(self) -> bool:
        return self._live is not None

    def version(self) -> str | None:
        live = self._live
        return live.version if live else None

    def predict(self, inputs: Sequence[DecodedLike], live: LiveModel | None = None) -> tuple[str, list[Prediction]]:
        """Predict decoded inputs with ``live`` (default: the current model); returns (version, predictions)."""
        live = live or self._live
        if live is None:
            raise NoModel("no model is loaded yet: promote or import a champion first")
        if not inputs:
            return live.version, []
        out: list[Prediction] = []
        for start in range(0, len(inputs), self.max_batch):
            chunk = inputs[start : start + self.max_batch]
            batch = torch.stack([live.transform(d) for d in chunk])
            with torch.inference_mode():
                emb, probs = live.forward(batch)
                conf, pred = probs.max(dim=1)
                probs_np, conf_np, pred_np = probs.cpu().numpy(), conf.cpu().numpy(), pred.cpu().numpy()
                self._reservoir.add(live.version, emb.float().cpu().numpy(), pred_np, conf_np)
            for row, c, p in zip(probs_np, conf_np, pred_np, strict=True):
                scores = {cls: float(v) for cls, v in zip(live.classes, row, strict=True)}
                out.append(Prediction(label=live.classes[int(p)], confidence=float(c), scores=scores))
        return live.version, out

    def reservoir_snapshot(self) -> ReservoirSnapshot:
        return self._reservoir.snapshot()

    # -- swapping -----------------------------------------------------------------
    def build(self, registry: Registry, version: str) -> LiveModel:
        """Load, verify and warm up a version; the current model keeps serving meanwhile."""
        manifest = registry.manifest(version)
        module = registry.load_model(version, self.settings).to(self.device).eval()
        spec = model_settings_for(manifest, self.settings).input
        live = LiveModel(
            version=version,
            architecture=manifest.architecture,
            module=module,
            transform=make_transform(spec, train=False),
            classes=tuple(manifest.classes),
            input=spec,
            device=self.device,
        )
        if self.settings.serving.warmup:
            # The first forward allocates and picks kernels; do it before traffic sees the model.
            with torch.inference_mode():
                live.forward(torch.zeros(2, *input_shape(spec)))
        return live

    def swap(self, live: LiveModel) -> None:
        old = self._live
        self._live = live
        if self.events is not None:
            self.events.model_swapped(live.version, live.architecture)
        log.info("serving model version %s (was %s)", live.version, old.version if old else "none")

    def sync(self, registry: Registry) -> bool:
        """Load the champion if the pointer moved; True if the live model changed.

        A version that fails its checksum (or cannot be built) is never swapped
        in: the current model keeps serving and the failure is logged, counted and
        recorded once per version.
        """
        try:
            target = registry.store.versions.champion_version()
        except StoreUnavailable as e:
            log.warning("cannot read the champion pointer (%s); still serving %s", e, self.version())
            return False
        if target is None or target == self.version() or target == self._failed:
            return False
        with self._swap_lock:
            # Read the pointer again under the lock: a caller that read it before a
            # concurrent swap would otherwise swap back to the older version.
            try:
                target = registry.store.versions.champion_version()
            except StoreUnavailable:
                return False
            if target is None or target == self.version() or target == self._failed:
                return False
            try:
                live = self.build(registry, target)
            except ChecksumMismatch as e:  # the registry already counted and recorded it
                self._failed = target
                log.error("NOT serving champion %s: %s; still serving %s", target, e, self.version())
                return False
            except (VersionNotFound, ModelError, OSError, RuntimeError) as e:
                self._failed = target
                self._count_failure(registry, target, e)
                return False
            self._failed = None
            self.swap(live)
            return True

    def _count_failure(self, registry: Registry, version: str, err: Exception) -> None:
        log.error("NOT serving champion %s: cannot load it (%s); still serving %s", version, err, self.version())
        if self.events is not None:
            self.events.model_refused(version)
        try:
            registry.store.records.add_event(
                "model_load_refused", f"model version {version}: {err}", {"version": version, "error": str(err)}
            )
        except StoreUnavailable:
            log.warning("could not record the refusal of %s: store unavailable", version)
