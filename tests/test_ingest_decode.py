from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from ingestutil import b64, image_bytes
from PIL import Image

from continual.config import InputSettings
from continual.ingest import InputError, ValidationFailed, decode_input, decode_inputs, decode_payload

VEC = InputSettings(kind="vector", shape=(4,))
GRID = InputSettings(kind="vector", shape=(2, 3))
IMG = InputSettings(kind="image")
PIXELS = 10_000


def vec(x: object, spec: InputSettings = VEC) -> np.ndarray:
    return decode_input({"x": x}, spec, max_image_pixels=PIXELS).vector()


def bad(obj: object, spec: InputSettings = VEC, pixels: int = PIXELS) -> InputError:
    with pytest.raises(InputError) as e:
        decode_input(obj, spec, max_image_pixels=pixels)  # type: ignore[arg-type]
    return e.value


def test_vector_is_stored_as_float32_little_endian() -> None:
    d = decode_input({"x": [1, 2.5, -3, 1e-3]}, VEC, max_image_pixels=PIXELS)
    assert d.kind == "vector" and d.image is None
    assert d.payload == np.array([1, 2.5, -3, 1e-3], dtype="<f4").tobytes()


def test_nested_lists_match_the_shape_and_flat_lists_are_accepted_too() -> None:
    nested = vec([[1, 2, 3], [4, 5, 6]], GRID)
    flat = vec([1, 2, 3, 4, 5, 6], GRID)
    assert nested.tolist() == flat.tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("x", "field", "words"),
    [
        ([1, 2, 3], "x", "expected 4 numbers, got 3"),
        ([1, 2, 3, 4, 5], "x", "got 5"),
        ([1, True, 3, 4], "x[1]", "boolean"),
        ([1, 2, "3", 4], "x[2]", "string"),
        ([1, 2, None, 4], "x[2]", "null"),
        ([1, 2, [3], 4], "x[2]", "list"),
        ([1, 2, float("nan"), 4], "x[2]", "finite"),
        ([1, float("inf"), 3, 4], "x[1]", "finite"),
        ([1, 2, 3, 1e39], "x[3]", "float32 range"),
        ([1, 2, 3, 10**400], "x", "too large"),
        ("1,2,3,4", "x", "got a string"),
        ({"a": 1}, "x", "got an object"),
    ],
)
def test_bad_vectors_name_the_field(x: object, field: str, words: str) -> None:
    err = bad({"x": x})
    assert err.field == field
    assert words in err.message


def test_nested_shape_mismatch_names_the_row() -> None:
    err = bad({"x": [[1, 2, 3], [4, 5]]}, GRID)
    assert err.field == "x[1]" and "expected length 3" in err.message


def test_missing_input_and_wrong_kind_are_explained() -> None:
    assert bad({}).field == "x"
    assert "not images" in bad({"image": "aGk="}).message
    assert "not vectors" in bad({"x": [1]}, IMG).message
    assert bad([1, 2]).message.startswith("expected a JSON object")


@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "PNG"), ("L", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")])
def test_png_and_jpeg_in_gray_or_rgb_keep_their_bytes(mode: str, fmt: str) -> None:
    data = image_bytes(mode=mode, fmt=fmt)
    d = decode_input({"image": b64(data)}, IMG, max_image_pixels=PIXELS)
    assert d.kind == "image" and d.payload == data
    assert d.image is not None and d.image.mode == mode and d.image.size == (8, 6)


def test_other_modes_become_rgb_or_gray() -> None:
    rgba = decode_input({"image": b64(image_bytes(mode="RGBA"))}, IMG, max_image_pixels=PIXELS)
    assert rgba.image is not None and rgba.image.mode == "RGB"
    la = decode_input({"image": b64(image_bytes(mode="LA"))}, IMG, max_image_pixels=PIXELS)
    assert la.image is not None and la.image.mode == "L"


def test_data_urls_are_accepted() -> None:
    data = image_bytes()
    d = decode_input({"image": "data:image/png;base64," + b64(data)}, IMG, max_image_pixels=PIXELS)
    assert d.payload == data


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    # A valid PNG signature and IHDR claiming a huge image, with a tiny IDAT: a decompression bomb's header.
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("not base64!!", "not valid base64"),
        ("", "empty image"),
        (b64(b"hello world, not an image"), "unsupported image format"),
        (b64(_gif()), "unsupported image format"),
        (b64(image_bytes()[:40]), "corrupt"),
        (b64(image_bytes(fmt="JPEG")[:100]), "corrupt"),
        (b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 50), "corrupt"),
        (b64(_png_header_only(1_000, 1_000)), "exceeds ingest.max_image_pixels"),
        (b64(_png_header_only(100_000, 100_000)), "too large"),
        (12, "expected a base64 string"),
    ],
)
def test_bad_images_are_refused(value: object, words: str) -> None:
    err = bad({"image": value}, IMG)
    assert err.field == "image"
    assert words in err.message


def test_pixel_limit_is_inclusive_and_checked_before_decoding() -> None:
    data = b64(image_bytes(w=10, h=10))
    assert decode_input({"image": data}, IMG, max_image_pixels=100).image is not None
    assert "100 pixels exceeds" in bad({"image": data}, IMG, pixels=99).message


def test_decode_inputs_reports_every_bad_input_with_its_index() -> None:
    with pytest.raises(ValidationFailed) as e:
        decode_inputs(
            [{"x": [1, 2, 3, 4]}, {"x": [1]}, {"x": [1, 2, 3, 4]}, {"x": [True, 1, 1, 1]}], VEC, max_image_pixels=1
        )
    assert [(d["index"], d["field"]) for d in e.value.details] == [(1, "x"), (3, "x[0]")]
    ok = decode_inputs([{"x": [0, 0, 0, 0]}] * 2, VEC, max_image_pixels=1)
    assert len(ok) == 2


def test_decode_payload_reads_back_what_the_store_keeps() -> None:
    d = decode_input({"x": [1, 2, 3, 4]}, VEC, max_image_pixels=PIXELS)
    assert decode_payload("vector", d.payload) == d
    data = image_bytes(mode="L")
    img = decode_payload("image", data)
    assert img.image is not None and img.image.mode == "L" and img.payload == data
    with pytest.raises(ValueError, match="float32"):
        decode_payload("vector", b"abc")
    with pytest.raises(ValueError, match="unknown payload kind"):
        decode_payload("audio", b"")
