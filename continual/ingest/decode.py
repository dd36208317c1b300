"""Wire formats of one input: ``{"x": numbers}``, ``{"image": "<base64 PNG or JPEG>"}`` or ``{"text": "..."}``.

The one place that knows them. Feedback and predict both decode through
:func:`decode_input`; training and drift read stored bytes back with
:func:`decode_payload`.

What a request may cost: before any pixel is decoded, the sum of width x height
over its images is read from their headers and held to a budget
(:func:`check_pixel_budget`, ``ingest.max_request_pixels``); then images are
decoded one at a time, each resized to the model's input at once, so a request
holds at most one full-size image.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from continual.config import InputSettings
from continual.models.transforms import fit_image

# Magic bytes of the two accepted encodings; anything else is refused before PIL sees it.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = frozenset({float, int})
# NUL and unpaired surrogates (legal in JSON escapes) have no place in UTF-8 text a database stores.
_BAD_TEXT_CHARS = re.compile("[\x00\ud800-\udfff]")
INPUT_FIELDS = {"vector": "x", "image": "image", "text": "text"}


@dataclass(frozen=True)
class Decoded:
    kind: Literal["vector", "image", "text"]
    # Exactly what the store keeps: float32 little-endian bytes (vectors), the
    # encoded PNG/JPEG bytes as received (images), or the text as UTF-8 (text).
    payload: bytes
    # For kind image, when kept: already converted and resized to the input spec (what the
    # model's transform makes of it), so a request never holds its full-size images.
    image: Image.Image | None = field(default=None, compare=False)

    def vector(self) -> np.ndarray:
        """The vector as float32 (flat); only for kind vector."""
        if self.kind != "vector":
            raise ValueError(f"not a vector input (kind {self.kind!r})")
        return np.frombuffer(self.payload, dtype="<f4")


class InputError(ValueError):
    """One bad field of one input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class ValidationFailed(ValueError):
    """Several inputs are bad; ``details`` holds ``{"index", "field", "message"}`` for every one."""

    def __init__(self, details: Sequence[dict[str, Any]]) -> None:
        self.details = list(details)
        first = self.details[0] if self.details else {"index": "?", "field": "?", "message": "?"}
        more = f" (and {len(self.details) - 1} more)" if len(self.details) > 1 else ""
        super().__init__(f"index {first['index']}, field {first['field']!r}: {first['message']}{more}")


class DecodedTooLarge(ValueError):
    """A request whose images would decode to more pixels than ``ingest.max_request_pixels`` (413)."""

    def __init__(self, pixels: int, limit: int, images: int) -> None:
        self.pixels, self.limit, self.images = pixels, limit, images
        super().__init__(
            f"the request's {images} images decode to {pixels} pixels (width x height, read from their headers), "
            f"over ingest.max_request_pixels = {limit}; send fewer or smaller images per request"
        )


def check_pixel_budget(values: Iterable[Any], limit: int) -> None:  # Any: JSON values (base64 strings, if valid)
    """Raise :class:`DecodedTooLarge` if the images among ``values`` have more than ``limit`` pixels in all.

    Reads only headers: nothing is decoded. A value that is not a readable image
    counts for nothing here; decoding it later names what is wrong with it.
    """
    total = images = 0
    for value in values:
        pixels = _header_pixels(value)
        if pixels:
            total += pixels
            images += 1
    if total > limit:
        raise DecodedTooLarge(total, limit, images)


def decode_input(
    obj: Any,  # Any: JSON
    spec: InputSettings,
    *,
    max_image_pixels: int,
    keep_image: bool = True,
) -> Decoded:
    """Decode one input object per ``spec.kind``; raises :class:`InputError` naming the field.

    An image is always decoded (corrupt data is refused here); ``keep_image=False`` drops
    it at once (feedback only stores the bytes), otherwise it is kept fitted to ``spec``.
    """
    if not isinstance(obj, dict):
        raise InputError("", f"expected a JSON object, got {_json_type(obj)}")
    if spec.kind == "text":
        if "text" not in obj:
            other = next((f for f in ("x", "image") if f in obj), None)
            hint = f" (this service takes text inputs, not {other!r})" if other else ""
            raise InputError("text", f"missing{hint}")
        return Decoded("text", decode_text(obj["text"], max_chars=spec.max_text_chars))
    if spec.kind == "vector":
        if "x" not in obj:
            hint = " (this service takes vector inputs, not images)" if "image" in obj else ""
            raise InputError("x", f"missing{hint}")
        return Decoded("vector", decode_vector(obj["x"], spec.shape))
    if "image" not in obj:
        hint = " (this service takes images, not vectors)" if "x" in obj else ""
        raise InputError("image", f"missing{hint}")
    payload, image = decode_image(obj["image"], max_image_pixels=max_image_pixels)
    if not keep_image:
        return Decoded("image", payload)
    # The full-size image dies here: only the model-sized copy stays alive with the request.
    mode = "L" if spec.channels == 1 else "RGB"
    return Decoded("image", payload, fit_image(image, mode, (spec.size[1], spec.size[0])))


class TooManyInputs(ValueError):
    """More inputs in one predict request than ``serving.max_batch`` (413)."""

    def __init__(self, n: int, limit: int) -> None:
        self.n, self.limit = n, limit
        super().__init__(f"{n} inputs exceed serving.max_batch = {limit}")


def predict_inputs(
    doc: Any,  # Any: the parsed JSON body, validated here
    spec: InputSettings,
    *,
    max_inputs: int,
    max_image_pixels: int,
    max_request_pixels: int,
) -> list[Decoded]:
    """A parsed ``{"inputs": [...]}`` predict request, decoded; every bad input is named in one ValidationFailed."""
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise ValidationFailed(
            [{"index": None, "field": "inputs", "message": 'expected {"inputs": [input, ...]} with at least one input'}]
        )
    if len(inputs) > max_inputs:
        raise TooManyInputs(len(inputs), max_inputs)
    return decode_inputs(inputs, spec, max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels)


def decode_inputs(
    objs: Sequence[Any],  # Any: JSON values under validation
    spec: InputSettings,
    *,
    max_image_pixels: int,
    max_request_pixels: int | None = None,
) -> list[Decoded]:
    """Decode every input, one image at a time; raises :class:`ValidationFailed` naming each bad one.

    With ``max_request_pixels``, the images' headers are summed first (:class:`DecodedTooLarge`).
    """
    if max_request_pixels is not None and spec.kind == "image":
        check_pixel_budget((o.get("image") for o in objs if isinstance(o, dict)), max_request_pixels)
    out: list[Decoded] = []
    details: list[dict[str, Any]] = []
    for i, obj in enumerate(objs):
        try:
            out.append(decode_input(obj, spec, max_image_pixels=max_image_pixels))
        except InputError as e:
            details.append({"index": i, "field": e.field, "message": e.message})
    if details:
        raise ValidationFailed(details)
    return out


def decode_payload(kind: str, payload: bytes) -> Decoded:
    """Rebuild a :class:`Decoded` from stored bytes (no size limit: the store's bytes passed one already)."""
    if kind == "vector":
        if len(payload) % 4:
            raise ValueError(f"vector payload of {len(payload)} bytes is not a whole number of float32")
        return Decoded("vector", payload)
    if kind == "image":
        return Decoded("image", payload, _open_image(payload, max_pixels=None))
    if kind == "text":
        return Decoded("text", payload)
    raise ValueError(f"unknown payload kind {kind!r}; expected 'vector', 'image' or 'text'")


# -- text -------------------------------------------------------------------------
def decode_text(value: Any, *, max_chars: int) -> bytes:  # Any: JSON value under validation
    """A non-empty string of at most ``max_chars`` characters, without NUL or lone surrogates -> UTF-8 bytes."""
    if not isinstance(value, str):
        raise InputError("text", f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise InputError("text", "empty text" if not value else "text has only whitespace")
    if len(value) > max_chars:
        raise InputError("text", f"{len(value)} characters exceeds [model.input] max_text_chars = {max_chars}")
    bad = _BAD_TEXT_CHARS.search(value)
    if bad:
        what = "NUL character" if bad.group() == "\x00" else "unpaired surrogate"
        raise InputError("text", f"contains a {what} at character {bad.start()} (not valid UTF-8 text)")
    return value.encode("utf-8")


# -- vectors ----------------------------------------------------------------------
def decode_vector(x: Any, shape: Sequence[int]) -> bytes:  # Any: JSON value under validation
    """Numbers as a flat list or nested lists matching ``shape`` -> float32 little-endian bytes."""
    size = math.prod(shape)
    if not isinstance(x, list):
        raise InputError("x", f"expected a list of {size} numbers, got {_json_type(x)}")
    flat: list[float | int]
    if len(shape) > 1 and x and isinstance(x[0], list):
        flat = []
        _flatten(x, tuple(shape), 0, flat, "x")
    else:
        if len(x) != size:
            nested = f" (or nested lists of shape {list(shape)})" if len(shape) > 1 else ""
            raise InputError("x", f"expected {size} numbers{nested}, got {len(x)}")
        flat = x
    # type() and not isinstance(): bool is an int subclass and must be refused.
    # The set of types is built at C speed; the loop only runs to name the culprit.
    if not _NUMBER_TYPES.issuperset(map(type, flat)):
        for i, v in enumerate(flat):
            if type(v) is not float and type(v) is not int:
                raise InputError(f"x[{i}]" if len(shape) == 1 else "x", f"expected a number, got {_json_type(v)}")
    try:
        arr = np.asarray(flat, dtype=np.float64)
    except OverflowError:
        raise InputError("x", "a number is too large to be a float32") from None
    # One reduction for the common case: NaN fails every comparison, inf exceeds the maximum.
    if not np.abs(arr).max() <= _FLOAT32_MAX:
        i = int(np.flatnonzero(~(np.abs(arr) <= _FLOAT32_MAX))[0])
        where = f"x[{i}]" if len(shape) == 1 else "x"
        raise InputError(
            where, f"every number must be finite and within float32 range, got {flat[i]!r} at flat index {i}"
        )
    return arr.astype("<f4").tobytes()


def _flatten(node: Any, shape: tuple[int, ...], depth: int, out: list[Any], path: str) -> None:  # Any: JSON
    # Depth is bounded by the configured shape, so hostile nesting cannot recurse deeply.
    if not isinstance(node, list):
        raise InputError(path, f"expected a list of length {shape[depth]}, got {_json_type(node)}")
    if len(node) != shape[depth]:
        raise InputError(path, f"expected length {shape[depth]} (shape {list(shape)}), got {len(node)}")
    if depth == len(shape) - 1:
        out.extend(node)
        return
    for i, child in enumerate(node):
        _flatten(child, shape, depth + 1, out, f"{path}[{i}]")


# -- images -----------------------------------------------------------------------
def decode_image(value: Any, *, max_image_pixels: int) -> tuple[bytes, Image.Image]:  # Any: JSON
    """Base64 PNG/JPEG -> (the encoded bytes as received, the decoded image in mode L or RGB)."""
    payload = image_payload(value)
    return payload, _open_image(payload, max_pixels=max_image_pixels)


def image_payload(value: Any) -> bytes:  # Any: JSON
    """Base64 (or a data URL) -> the encoded bytes; nothing is decoded."""
    if not isinstance(value, str):
        raise InputError("image", f"expected a base64 string, got {_json_type(value)}")
    text = value.strip()
    if text.startswith("data:"):
        # Accept data URLs (data:image/png;base64,...), which browsers produce.
        _, _, text = text.partition(",")
    try:
        payload = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image", "not valid base64") from None
    if not payload:
        raise InputError("image", "empty image")
    return payload


def _header_pixels(value: Any) -> int:  # Any: JSON
    """width x height from a base64 image's header (nothing decoded); 0 if it is not a readable image."""
    try:
        payload = image_payload(value)
    except InputError:
        return 0
    if not (payload.startswith(_PNG_MAGIC) or payload.startswith(_JPEG_MAGIC)):
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload), formats=("PNG", "JPEG")) as img:
                w, h = img.size
    except Exception:  # corrupt, or over PIL's own bomb limit: decoding refuses it, naming the input
        return 0
    return max(w, 0) * max(h, 0)


def _open_image(payload: bytes, *, max_pixels: int | None) -> Image.Image:
    if not (payload.startswith(_PNG_MAGIC) or payload.startswith(_JPEG_MAGIC)):
        raise InputError("image", "unsupported image format: expected PNG or JPEG bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; PIL's global bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(payload), formats=("PNG", "JPEG"))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise InputError("image", f"image has no pixels ({w}x{h})")
            # Checked from the header, before any pixel is decoded (decompression bombs).
            if max_pixels is not None and w * h > max_pixels:
                raise InputError("image", f"{w}x{h} = {w * h} pixels exceeds ingest.max_image_pixels = {max_pixels}")
            img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError("image", f"image too large: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on corrupt data
        raise InputError("image", f"corrupt or unreadable image: {type(e).__name__}: {e}") from None
    if img.mode == "L" or img.mode == "RGB":
        return img
    # Grayscale variants (1-bit, 16-bit, LA) stay one channel; everything else becomes RGB.
    return img.convert("L" if img.mode in ("1", "I", "I;16", "I;16B", "I;16L", "F", "LA") else "RGB")


def _json_type(v: Any) -> str:  # Any: any JSON value, named for an error message
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__
