"""Input transforms: one decoded sample -> one float tensor. Training and prediction share this code."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from continual.config import DEFAULT_MAX_IMAGE_PIXELS, InputSettings


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
    if spec.kind == "text":
        return (2, spec.max_length)  # token ids and attention mask (continual.models.text)
    return (spec.channels, spec.size[0], spec.size[1])


def make_transform(
    spec: InputSettings, *, train: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Callable[[DecodedLike], torch.Tensor]:
    """The transform for one sample; ``train`` adds augmentation only if ``spec.augment`` is on.

    ``max_pixels`` (``ingest.max_image_pixels``) caps stored images, read from their header before decoding.
    """
    if spec.kind == "vector":
        return VectorTransform(tuple(spec.shape))
    if spec.kind == "text":
        from continual.models.text import TextTransform

        return TextTransform(spec)
    return ImageTransform(
        spec, augment=train and spec.augment, domain=spec.augment_domain if train else (), max_pixels=max_pixels
    )


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

    def __init__(
        self,
        spec: InputSettings,
        *,
        augment: bool = False,
        domain: tuple[str, ...] = (),
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.mode = "L" if spec.channels == 1 else "RGB"
        self.height, self.width = spec.size
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.domain = tuple(domain)
        self.max_pixels = max_pixels

    def __call__(self, sample: DecodedLike) -> torch.Tensor:
        if sample.kind != "image":
            raise TransformError(f"expected an image input, got kind {sample.kind!r}")
        img = sample.image if getattr(sample, "image", None) is not None else _open(sample.payload, self.max_pixels)
        size = (self.width, self.height)
        img = self._augment(img.convert(self.mode)) if self.augment else fit_image(img, self.mode, size)
        if self.domain:
            img = self._domain(img)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr.reshape(self.height, self.width, -1)).permute(2, 0, 1)
        if "noise" in self.domain:
            # Sensor noise: a random strength per image, up to 5% of the pixel range.
            t = (t + torch.randn_like(t) * float(torch.rand(())) * 0.05).clamp(0.0, 1.0)
        return (t - self.mean) / self.std

    def _domain(self, img: Image.Image) -> Image.Image:
        # Photometric only (``[model.input] augment_domain``): what a new camera, scanner or lighting
        # changes, never the geometry that carries the label.
        from torchvision.transforms import v2

        ops: list[object] = []
        if "color_jitter" in self.domain:
            hue = 0.05 if self.mode == "RGB" else 0.0
            ops.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if hue else 0.0, hue=hue))
        if "blur" in self.domain:
            ops.append(v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.5))], p=0.5))
        return v2.Compose(ops)(img) if ops else img  # type: ignore[arg-type]

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


def fit_image(img: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """``img.convert(mode).resize(size, BILINEAR)``, pixel for pixel, without a full-size RGB copy of a gray image.

    ``size`` is (width, height). Gray to RGB repeats the one channel, and resizing treats
    channels alike, so resizing the gray image first gives the same pixels at a third of the memory.
    """
    if img.mode != mode:
        if mode == "RGB" and img.mode in ("1", "L"):
            return img.convert("L").resize(size, Image.Resampling.BILINEAR).convert("RGB")
        img = img.convert(mode)
    return img.resize(size, Image.Resampling.BILINEAR)


def _open(payload: bytes, max_pixels: int) -> Image.Image:
    """A stored PNG/JPEG, refused from its header when it has more than ``max_pixels`` pixels."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; PIL's global bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(payload), formats=("PNG", "JPEG"))
            w, h = img.size
            if w * h > max_pixels:
                raise TransformError(f"{w}x{h} = {w * h} pixels exceeds ingest.max_image_pixels = {max_pixels}")
            img.load()
    except TransformError:
        raise
    except Exception as e:  # PIL raises many types for bad bytes
        raise TransformError(f"image bytes cannot be decoded: {e}") from None
    return img
