"""Read labeled samples from files, as wire-format sample dicts with deterministic ids.

Formats: an ImageFolder tree (``PATH/<class>/<file>.png|jpg``), an ``.npz`` with
``x`` and ``y`` arrays, a CSV with a ``label`` column (and feature columns, an
``image`` column, a ``text`` column, or a ``prediction_id`` column: labels for logged
predictions), or JSON Lines (``.jsonl``) of ``{"text", "label", "id"?}``. Each id is derived
from where the sample sits and what it holds (relative path or row, plus a hash
of label and content), so importing the same files again sends the same ids and
the server counts them as duplicates: an interrupted import is resumed by
running it again.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
MAX_ID = 255


class ImportFormatError(ValueError):
    """The path is not one of the importable formats, or lacks what the format needs."""


@dataclass(frozen=True)
class Item:
    where: str  # for messages: a relative path or "file.csv row 7"
    sample: dict[str, Any]


@dataclass(frozen=True)
class Skipped:
    where: str
    reason: str


@dataclass(frozen=True)
class Source:
    kind: str  # "imagefolder" | "npz" | "csv" | "jsonl"
    total: int
    items: Iterator[Item | Skipped]


def open_source(path: str | Path, *, images: bool = False) -> Source:
    """Pick the reader by what ``path`` is; ``images`` PNG-encodes ``.npz`` rows instead of sending vectors."""
    p = Path(path)
    if p.is_dir():
        return _imagefolder(p)
    if not p.is_file():
        raise ImportFormatError(f"{p}: no such file or directory")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _npz(p, images=images)
    if suffix == ".csv":
        return _csv(p)
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl(p)
    raise ImportFormatError(
        f"{p}: unknown format {suffix!r}; expected a directory tree, a .npz, a .csv or a .jsonl file"
    )


def sample_id(prefix: str, where: str, label: str, content: bytes) -> str:
    """``<prefix>:<where>:<16 hex of sha256(label NUL content)>``; long locations are hashed to fit 255 chars."""
    digest = hashlib.sha256(label.encode("utf-8") + b"\0" + content).hexdigest()[:16]
    out = f"{prefix}:{where}:{digest}"
    if len(out) > MAX_ID:
        out = f"{prefix}:{hashlib.sha256(where.encode('utf-8')).hexdigest()[:32]}:{digest}"
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- ImageFolder ------------------------------------------------------------------
def _imagefolder(root: Path) -> Source:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ImportFormatError(f"{root}: no class directories; expected {root}/<class>/<file>.png|jpg")
    files = [
        (c.name, f)
        for c in classes
        for f in sorted(c.rglob("*"))
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)
    ]

    def items() -> Iterator[Item | Skipped]:
        for label, f in files:
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                yield Skipped(rel, f"not a .png/.jpg/.jpeg file ({f.suffix or 'no suffix'})")
                continue
            data = f.read_bytes()
            yield Item(rel, {"id": sample_id("file", rel, label, data), "label": label, "image": _b64(data)})

    return Source("imagefolder", len(files), items())


# -- .npz -------------------------------------------------------------------------
def _npz(path: Path, *, images: bool) -> Source:
    try:
        # allow_pickle=False: object arrays in a file from elsewhere could run code.
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise ImportFormatError(f"{path}: needs arrays 'x' and 'y', found {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ImportFormatError):
            raise
        raise ImportFormatError(f"{path}: cannot read as .npz: {e}") from None
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise ImportFormatError(f"{path}: x {x.shape} and y {y.shape} must have the same length (y one-dimensional)")
    if images and not (x.dtype == np.uint8 and (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3)))):
        raise ImportFormatError(f"{path}: images need x as uint8 [N, H, W] or [N, H, W, 1|3], got {x.dtype} {x.shape}")
    labels = _labels(y)

    def items() -> Iterator[Item | Skipped]:
        for i in range(len(x)):
            where, label = f"{path.name} row {i}", labels[i]
            if images:
                data = _png(x[i])
                sample = {"label": label, "image": _b64(data)}
            else:
                data = np.ascontiguousarray(x[i], dtype="<f4").tobytes()
                sample = {"label": label, "x": x[i].tolist()}
            yield Item(where, {"id": sample_id("npz", f"{path.name}:{i}", label, data), **sample})

    return Source("npz", len(y), items())


def _labels(y: np.ndarray) -> list[str]:
    # Integral float labels (3.0) name the same class as 3.
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return [str(int(v)) for v in y]
    if y.dtype.kind == "b":
        return [str(int(v)) for v in y]
    return [str(v) for v in y.tolist()]


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- CSV --------------------------------------------------------------------------
def _csv(path: Path) -> Source:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        total = sum(1 for _ in reader)
    if not header or "label" not in header:
        raise ImportFormatError(f"{path}: needs a header row with a 'label' column, got {header}")
    if len(set(header)) != len(header):
        raise ImportFormatError(f"{path}: repeated column names in header {header}")
    if "prediction_id" in header:
        return _csv_references(path, header, total)
    if "text" in header and "image" in header:
        raise ImportFormatError(f"{path}: a 'text' and an 'image' column; a CSV holds one kind of input")
    has_image, has_text = "image" in header, "text" in header
    features = [c for c in header if c not in ("label", "id", "image", "text")]
    if not has_image and not has_text and not features:
        raise ImportFormatError(f"{path}: no feature columns and no 'image' column")

    def items() -> Iterator[Item | Skipped]:
        with path.open(newline="", encoding="utf-8") as f:
            for row_no, row in enumerate(csv.DictReader(f), start=2):  # line numbers as an editor shows them
                where = f"{path.name} line {row_no}"
                label = (row.get("label") or "").strip()
                if not label:
                    yield Skipped(where, "empty label")
                    continue
                given_id = (row.get("id") or "").strip()
                if has_text:
                    item = _csv_text(row, label, features, where)
                elif has_image:
                    item = _csv_image(path, row, label, features, where)
                else:
                    item = _csv_vector(row, label, features, where)
                if isinstance(item, Skipped):
                    yield item
                    continue
                sample, content = item
                sample["id"] = given_id or sample_id("csv", f"{path.name}:{row_no}", label, content)
                yield Item(where, sample)

    return Source("csv", total, items())


def _csv_references(path: Path, header: list[str], total: int) -> Source:
    """``prediction_id,label`` rows: labels for predictions the service logged (it has their inputs).

    No id is derived here: the service's ``"prediction:<id>"`` already makes a re-import a duplicate.
    Columns other than ``id`` become metadata.
    """
    extra = [c for c in header if c not in ("prediction_id", "label", "id")]

    def items() -> Iterator[Item | Skipped]:
        with path.open(newline="", encoding="utf-8") as f:
            for row_no, row in enumerate(csv.DictReader(f), start=2):
                where = f"{path.name} line {row_no}"
                pid, label = (row.get("prediction_id") or "").strip(), (row.get("label") or "").strip()
                if not pid or not label:
                    yield Skipped(where, "empty prediction_id" if not pid else "empty label")
                    continue
                sample: dict[str, Any] = {"prediction_id": pid, "label": label}
                if (row.get("id") or "").strip():
                    sample["id"] = row["id"].strip()
                meta = {c: row[c] for c in extra if row.get(c) not in (None, "")}
                if meta:
                    sample["metadata"] = meta
                yield Item(where, sample)

    return Source("csv", total, items())


def _csv_vector(
    row: dict[str, Any], label: str, features: list[str], where: str
) -> tuple[dict[str, Any], bytes] | Skipped:
    values: list[float] = []
    for c in features:
        raw = (row.get(c) or "").strip()
        try:
            v = float(raw)
        except ValueError:
            return Skipped(where, f"column {c!r}: {raw!r} is not a number")
        if not math.isfinite(v):
            return Skipped(where, f"column {c!r}: {raw!r} is not finite")
        values.append(v)
    return {"label": label, "x": values}, np.asarray(values, dtype="<f4").tobytes()


def _csv_image(
    path: Path, row: dict[str, Any], label: str, extra: list[str], where: str
) -> tuple[dict[str, Any], bytes] | Skipped:
    rel = (row.get("image") or "").strip()
    if not rel:
        return Skipped(where, "empty 'image' column")
    base = path.parent.resolve()
    file = (base / rel).resolve()  # symlinks followed: where the bytes really are
    if Path(rel).is_absolute() or not file.is_relative_to(base):
        return Skipped(where, f"image {rel!r} is outside {base} (paths are relative to the CSV's directory)")
    try:
        data = file.read_bytes()
    except OSError as e:
        return Skipped(where, f"image {rel!r}: {e.strerror or e}")
    sample: dict[str, Any] = {"label": label, "image": _b64(data)}
    meta = {c: row[c] for c in extra if row.get(c) not in (None, "")}
    if meta:
        sample["metadata"] = meta
    return sample, data


def _csv_text(row: dict[str, Any], label: str, extra: list[str], where: str) -> tuple[dict[str, Any], bytes] | Skipped:
    """A ``text`` column (sent as it is: the service validates it); the other columns become metadata."""
    text = row.get("text") or ""
    if not text.strip():
        return Skipped(where, "empty 'text' column")
    sample: dict[str, Any] = {"label": label, "text": text}
    meta = {c: row[c] for c in extra if row.get(c) not in (None, "")}
    if meta:
        sample["metadata"] = meta
    return sample, text.encode("utf-8", "surrogatepass")


# -- JSON Lines -------------------------------------------------------------------
JSONL_KEYS = ("text", "label", "id", "metadata")


def _jsonl(path: Path) -> Source:
    """One ``{"text", "label", "id"?, "metadata"?}`` object per line; other keys join the metadata."""
    with path.open(encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())

    def items() -> Iterator[Item | Skipped]:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path.name} line {line_no}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    yield Skipped(where, f"not JSON: {e}")
                    continue
                if not isinstance(obj, dict):
                    yield Skipped(where, "expected a JSON object {text, label, id}")
                    continue
                label, text = obj.get("label"), obj.get("text")
                if not isinstance(label, str) or not label.strip():
                    yield Skipped(where, "missing or empty 'label'")
                    continue
                if not isinstance(text, str) or not text.strip():
                    yield Skipped(where, "missing or empty 'text'")
                    continue
                meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
                meta = {**meta, **{k: v for k, v in obj.items() if k not in JSONL_KEYS}}
                sample: dict[str, Any] = {"label": label.strip(), "text": text}
                if meta:
                    sample["metadata"] = meta
                given = obj.get("id")
                content = text.encode("utf-8", "surrogatepass")
                sample["id"] = (
                    str(given)
                    if given not in (None, "")
                    else sample_id("jsonl", f"{path.name}:{line_no}", label.strip(), content)
                )
                yield Item(where, sample)

    return Source("jsonl", total, items())
