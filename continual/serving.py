"""The live model: one immutable object behind one reference, hot-swapped, following the champion pointer.

Requests read ``Serving.live`` once and use that object to the end, so a swap
never changes the model under a request in flight, and the read path takes no
lock. A swap builds and warms up the new :class:`LiveModel` first, then replaces
the reference (an atomic attribute store).

Every answered input gets a prediction id; with a :class:`~continual.predlog.PredictionLog`
attached, its predictions go to the store's prediction log off the request path.
Served probabilities are calibrated by the version's temperature (fitted on its holdout
when it was built; 1.0 for versions without one). The service's ``sync_champion`` job
(:mod:`continual.service.jobs`) calls :meth:`Serving.sync` every
``serving.poll_interval_seconds``, so every process follows the pointer.
"""

from __future__ import annotations

import logging
import threading
import time
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
from continual.models.typicality import Typicality
from continual.predlog import PredictionLog, new_prediction_id
from continual.registry import ChecksumMismatch, Manifest, Registry, VersionNotFound
from continual.store import StoreUnavailable

log = logging.getLogger("continual.serving")


class NoModel(RuntimeError):
    """No champion has been loaded yet."""


# A champion that failed to load is tried again after 5 s, 10 s, 20 s, ... at most 5 min apart.
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class LoadFailure:
    version: str
    error: str
    attempts: int
    retry_at: float  # time.monotonic()

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "error": self.error,
            "attempts": self.attempts,
            "retry_in_seconds": round(max(0.0, self.retry_at - time.monotonic()), 1),
        }


class ServingEvents(Protocol):
    """What serving reports as it happens (``continual.metrics.Metrics`` mirrors it)."""

    def model_swapped(self, version: str, architecture: str) -> None: ...

    def model_refused(self, version: str) -> None: ...


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    scores: dict[str, float]
    prediction_id: str = ""
    # Embedding distance from the version's holdout / its 99th percentile (> 1: far); None without one.
    distance: float | None = None


def _typicality(registry: Registry, version: str) -> Typicality | None:
    tensors = registry.load_tensors(version, "typicality")
    return Typicality.from_tensors(tensors) if tensors else None


def temperature_of(manifest: Manifest) -> float:
    """The version's calibration temperature (``extra.calibration.temperature``); 1.0 when it has none."""
    calibration = manifest.extra.get("calibration") or {}
    t = calibration.get("temperature") if isinstance(calibration, dict) else None
    return float(t) if isinstance(t, (int, float)) and t > 0 else 1.0


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
    temperature: float = 1.0  # served probabilities are softmax(logits / temperature)
    typicality: Typicality | None = None  # how far inputs are from the version's holdout

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, uncalibrated probabilities): the backbone runs once, the head on its output."""
        emb, logits = self.logits(batch)
        return emb, torch.softmax(logits, dim=1)

    def logits(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.module.backbone(batch.to(self.device, non_blocking=True))
        return emb, self.module.head(emb).float()


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

    def __init__(
        self, settings: Settings, events: ServingEvents | None = None, log: PredictionLog | None = None
    ) -> None:
        self.settings = settings
        self.events = events
        self.log = log
        self.device = resolve_device(settings.serving.device)
        self.max_batch = settings.serving.max_batch
        self._live: LiveModel | None = None
        self._failed: LoadFailure | None = None  # the champion this process could not load, retried with backoff
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
        """Predict decoded inputs with ``live`` (default: the current model); returns (version, predictions).

        Each prediction carries a new prediction id; with a log attached, they are logged.
        """
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
                emb, logits = live.logits(batch)
                raw = torch.softmax(logits, dim=1)
                conf, pred = raw.max(dim=1)
                emb_np = emb.float().cpu().numpy()
                # The drift reservoir keeps uncalibrated confidences: the prediction-shift detector
                # compares them with the champion's own softmax on the reference window.
                self._reservoir.add(live.version, emb_np, pred.cpu().numpy(), conf.cpu().numpy())
                probs = raw if live.temperature == 1.0 else torch.softmax(logits / live.temperature, dim=1)
                probs_np = probs.cpu().numpy()
                far = live.typicality.ratio(emb_np) if live.typicality is not None else None
            pred_np = pred.cpu().numpy()
            for i, (row, p) in enumerate(zip(probs_np, pred_np, strict=True)):
                scores = {cls: float(v) for cls, v in zip(live.classes, row, strict=True)}
                out.append(
                    Prediction(
                        label=live.classes[int(p)],
                        confidence=float(row[int(p)]),
                        scores=scores,
                        prediction_id=new_prediction_id(),
                        distance=None if far is None else float(far[i]),
                    )
                )
        if self.log is not None:
            self.log.submit(live.version, [p.prediction_id for p in out], out, inputs)
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
            transform=make_transform(spec, train=False, max_pixels=self.settings.ingest.max_image_pixels),
            classes=tuple(manifest.classes),
            input=spec,
            device=self.device,
            temperature=temperature_of(manifest),
            typicality=_typicality(registry, version),
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
        if target is None or target == self.version() or self._backing_off(target):
            return False
        with self._swap_lock:
            # Read the pointer again under the lock: a caller that read it before a
            # concurrent swap would otherwise swap back to the older version.
            try:
                target = registry.store.versions.champion_version()
            except StoreUnavailable:
                return False
            if target is None or target == self.version() or self._backing_off(target):
                return False
            try:
                live = self.build(registry, target)
            except ChecksumMismatch as e:  # the registry already counted and recorded it
                self._fail(target, e)
                log.error("NOT serving champion %s: %s; still serving %s", target, e, self.version())
                return False
            except (VersionNotFound, ModelError, OSError, RuntimeError) as e:
                # A transient cause (a CUDA out-of-memory while another model loads, a file
                # still being copied) must not leave this process behind for good.
                self._fail(target, e)
                self._count_failure(registry, target, e)
                return False
            self._failed = None
            self.swap(live)
            return True

    def load_failure(self) -> LoadFailure | None:
        """The champion this process could not load (it serves the previous model meanwhile), or None."""
        return self._failed

    def _backing_off(self, target: str) -> bool:
        f = self._failed
        return f is not None and f.version == target and time.monotonic() < f.retry_at

    def _fail(self, version: str, err: Exception) -> None:
        attempts = self._failed.attempts + 1 if self._failed is not None and self._failed.version == version else 1
        wait = min(RETRY_FIRST_SECONDS * 2 ** (attempts - 1), RETRY_MAX_SECONDS)
        self._failed = LoadFailure(version, f"{type(err).__name__}: {err}", attempts, time.monotonic() + wait)

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
