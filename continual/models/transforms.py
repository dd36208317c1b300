"""Input transforms: one decoded sample -> one float tensor. Training and prediction share this code."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from continual.config import InputSettings


class DecodedLike(Protocol):
    """What :class:`continual.ingest.decode.Decoded` provides (models must not import ingest)."""

    kind: str
    payload: bytes
    image: Image.Image | None


class TransformError(ValueError):
    """A sample that does not fit the configured input spec."""


class StoredInput(Protocol):
    """A stored sample as training, evaluation and drift read it back (``continual.store.SampleRow`` is one)."""

    seq: int
    external_id: str
    kind: str
    payload: bytes


class BadSample(ValueError):
    """A stored sample that cannot be decoded or transformed; a run fails naming it."""

    def __init__(self, seq: int, external_id: str, reason: str) -> None:
        self.seq, self.external_id, self.reason = seq, external_id, reason
        super().__init__(f"sample seq={seq} id={external_id!r} cannot be used: {reason}")


def transform_stored(row: StoredInput, transform: Callable[[DecodedLike], torch.Tensor]) -> torch.Tensor:
    """``transform`` of a stored sample; any failure names the sample (:class:`BadSample`)."""
    try:
        return transform(_Stored(row.kind, row.payload))
    except Exception as e:  # a corrupt payload must name the sample, whatever the decoder raised
        raise BadSample(row.seq, row.external_id, f"{type(e).__name__}: {e}") from e


class _Stored:
    """Stored bytes as a transform takes them: images are decoded by the transform itself."""

    __slots__ = ("image", "kind", "payload")

    def __init__(self, kind: str, payload: bytes) -> None:
        self.kind, self.payload, self.image = kind, payload, None


def input_shape(spec: InputSettings) -> tuple[int, ...]:
    """Shape of one transformed sample (no batch dimension)."""
    if spec.kind == "vector":
        return tuple(spec.shape)
    return (spec.channels, spec.size[0], spec.size[1])


def make_transform(spec: InputSettings, *, train: bool = False) -> Callable[[DecodedLike], torch.Tensor]:
    """The transform for one sample; ``train`` adds augmentation only if ``spec.augment`` is on."""
    if spec.kind == "vector":
        return VectorTransform(tuple(spec.shape))
    return ImageTransform(spec, augment=train and spec.augment)


class VectorTransform:
    """float32 little-endian bytes -> tensor of the configured shape."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.size = int(np.prod(shape))

    def __call__(self, sample: DecodedLike) -> torch.Tensor:
        if sample.kind != "vector":
            raise TransformError(f"expected a vector input, got kind {sample.kind!r}")
        arr = np.frombuffer(sample.payload, dtype="<f4")
        if arr.size != self.size:
            raise TransformError(
                f"vector has {arr.size} values, the model takes {self.size} (shape {list(self.shape)})"
            )
        return torch.from_numpy(arr.astype(np.float32)).reshape(self.shape)


class ImageTransform:
    """Encoded or decoded image -> resized, normalised ``(C, H, W)`` tensor."""

    def __init__(self, spec: InputSettings, *, augment: bool = False) -> None:
        self.mode = "L" if spec.channels == 1 else "RGB"
        self.height, self.width = spec.size
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __call__(self, sample: DecodedLike) -> torch.Tensor:
        if sample.kind != "image":
            raise TransformError(f"expected an image input, got kind {sample.kind!r}")
        img = sample.image if getattr(sample, "image", None) is not None else _open(sample.payload)
        img = img.convert(self.mode)
        size = (self.width, self.height)
        img = self._augment(img) if self.augment else img.resize(size, Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr.reshape(self.height, self.width, -1)).permute(2, 0, 1)
        return (t - self.mean) / self.std

    def _augment(self, img: Image.Image) -> Image.Image:
        # Mild on purpose: online updates see few samples, and strong augmentation
        # would move the training distribution away from what serving sees.
        from torchvision.transforms import v2

        ops = v2.Compose(
            [
                v2.RandomResizedCrop((self.height, self.width), scale=(0.8, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )
        return ops(img)


def _open(payload: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(payload))
        img.load()
    except Exception as e:  # PIL raises many types for bad bytes
        raise TransformError(f"image bytes cannot be decoded: {e}") from None
    return img
