"""A feedback request body -> validated store rows, all or nothing.

Pure: no I/O, so the route only wires bytes in and maps the named exceptions
below to HTTP codes (see ``continual.api``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from typing import Any

import orjson

from continual.config import ModelSettings, Settings
from continual.ingest.decode import (
    INPUT_FIELDS,
    InputError,
    ValidationFailed,
    _json_type,
    check_pixel_budget,
    decode_input,
)
from continual.ingest.reference import REFERENCE_KEYS, PredictionLookup, Reference, resolve
from continual.store import ClassLimit, NewSample

_BAD_ID_CHARS = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
SAMPLE_KEYS = frozenset({"id", "label", "metadata", *INPUT_FIELDS.values()})
MAX_ID_LENGTH = 255


class MalformedBody(ValueError):
    """The body is not JSON at all (400)."""


class BatchTooLarge(ValueError):
    """More samples in one request than ``ingest.max_batch_samples`` (413)."""

    def __init__(self, n: int, limit: int) -> None:
        self.n, self.limit = n, limit
        super().__init__(f"{n} samples in one request exceeds ingest.max_batch_samples = {limit}; split the batch")


def parse_json(body: bytes) -> Any:  # Any: parsed JSON, validated by the caller
    try:
        # orjson parses number-heavy batches ~10x faster; anything it refuses (NaN literals,
        # huge integers, lone surrogates, bad UTF-8) goes through the stdlib for a precise answer.
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except RecursionError:
        raise MalformedBody("body is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise MalformedBody(f"body is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except ValueError as e:  # JSONDecodeError, and int-size limits of the decoder
        raise MalformedBody(f"body is not valid JSON: {e}") from None


def derived_id(label: str, kind: str, payload: bytes) -> str:
    """The id of a sample sent without one: ``"sha256:" + hex(sha256(label NUL kind NUL payload))``.

    Re-sending the same content therefore dedupes; the same input with another
    label is another sample (two labellers may disagree).
    """
    h = hashlib.sha256()
    h.update(label.encode("utf-8") + b"\0" + kind.encode("ascii") + b"\0")
    h.update(payload)
    return "sha256:" + h.hexdigest()


def class_limit(model: ModelSettings) -> ClassLimit | None:
    """What ``Store.insert`` must enforce for a batch that passed :func:`feedback_samples` (None: nothing)."""
    return ClassLimit(model.max_classes, tuple(model.classes)) if model.new_classes == "accept" else None


def label_problem(label: Any, model: ModelSettings, known: Collection[str] = ()) -> str:  # Any: a JSON value
    """Why ``label`` cannot be stored ("" if it can).

    A configured class always can. With ``[model] new_classes = "accept"`` so can
    a stored one (``known``) and any string that matches ``label_pattern`` and
    ``max_label_length``; with "refuse" nothing else.
    """
    if not isinstance(label, str):
        # Never repr() it: a label nested 1,000 deep would overflow the stack.
        return f"expected a string (a class name), got {_json_type(label)}"
    if label in model.classes:
        return ""
    if model.new_classes == "refuse":
        shown = ", ".join(repr(c) for c in model.classes[:20]) + (" ..." if len(model.classes) > 20 else "")
        return f'{label!r} is not one of the configured classes ({shown}) and [model] new_classes = "refuse"'
    if label in known:
        return ""
    if len(label) > model.max_label_length:
        return f"new class {label[:40]!r}...: {len(label)} characters exceeds [model] max_label_length = {model.max_label_length}"
    if not re.fullmatch(model.label_pattern, label):
        return f"new class {label!r} does not match [model] label_pattern = {model.label_pattern!r}"
    return ""


def feedback_samples(
    doc: Any,  # Any: parsed JSON
    settings: Settings,
    *,
    source: str = "api",
    predictions: PredictionLookup | None = None,
    known: Collection[str] = (),
) -> list[NewSample]:
    """Validate a parsed ``{"samples": [...]}`` document; every bad sample is named in one ValidationFailed.

    ``known``: the labels stored already (``store.classes.names()``); with
    ``new_classes = "accept"`` they and new labels that follow the label rules pass,
    as long as the known and new classes together stay within ``max_classes``
    (``Store.insert`` with :func:`class_limit` enforces that again, atomically).
    A sample ``{"prediction_id", "label"}`` is built from the logged prediction
    (``predictions``, one lookup for the batch; see :mod:`continual.ingest.reference`).
    """
    if not isinstance(doc, dict):
        raise ValidationFailed([{"index": None, "field": "", "message": 'expected a JSON object {"samples": [...]}'}])
    extra = sorted(set(doc) - {"samples"})
    if "samples" not in doc or extra:
        message = f"unknown key(s) {extra}; expected only 'samples'" if extra else "missing"
        raise ValidationFailed([{"index": None, "field": "samples" if not extra else extra[0], "message": message}])
    items = doc["samples"]
    if not isinstance(items, list):
        raise ValidationFailed([{"index": None, "field": "samples", "message": "expected a list of samples"}])
    if len(items) > settings.ingest.max_batch_samples:
        raise BatchTooLarge(len(items), settings.ingest.max_batch_samples)
    if settings.model.input.kind == "image":
        # Before any image is decoded: the whole request's pixels, from the headers (413).
        check_pixel_budget(
            (it.get("image") for it in items if isinstance(it, dict)), settings.ingest.max_request_pixels
        )
    out: list[NewSample | None] = []
    refs: list[Reference] = []
    details: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, dict) and "prediction_id" in item:
                refs.append(_reference(i, item, settings, known))
                out.append(None)
                continue
            sample = _sample(item, settings, source, known)
        except InputError as e:
            details.append({"index": i, "field": e.field, "message": e.message})
            continue
        except _FieldErrors as e:
            details.extend({"index": i, "field": f, "message": m} for f, m in e.errors)
            continue
        out.append(sample)
    details.extend(_beyond_max_classes(items, settings.model, known) if not details else [])
    if details:
        raise ValidationFailed(details)
    by_reference = resolve(refs, predictions, settings, source)
    # The payload cap is the store's: ``Store.insert`` refuses oversize payloads, naming each one.
    return [s if s is not None else by_reference[i] for i, s in enumerate(out)]


def _beyond_max_classes(items: list[Any], model: ModelSettings, known: Collection[str]) -> list[dict[str, Any]]:
    """One detail per sample whose new label would be class number max_classes + 1 or later."""
    if model.new_classes != "accept":
        return []
    taken = set(model.classes) | set(known)
    new = list(dict.fromkeys(str(item["label"]) for item in items if str(item["label"]) not in taken))
    refused = set(new[max(0, model.max_classes - len(taken)) :])
    return [
        {"index": i, "field": "label", "message": f"new class {item['label']!r} would exceed [model] max_classes = "
         f"{model.max_classes} ({len(taken)} classes known)"}
        for i, item in enumerate(items)
        if item["label"] in refused
    ]  # fmt: skip


def id_problem(value: Any) -> str:  # Any: JSON value under validation
    """What is wrong with a sample id ("" when nothing): feedback and exclusions share the rule."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_LENGTH:
        return f"must be a non-empty string of at most {MAX_ID_LENGTH} characters"
    # Control characters and lone surrogates (legal in JSON escapes) cannot be stored as text everywhere
    # (PostgreSQL refuses NUL; UTF-8 has no surrogates).
    if _BAD_ID_CHARS.search(value):
        return "must not contain control characters or unpaired surrogates"
    return ""


def _metadata_problem(value: Any, limit: int, max_depth: int) -> str:  # Any: JSON value under validation
    if not isinstance(value, dict):
        return "must be a JSON object"
    # json.dumps (and the database driver after it) recurse: bound depth and size first, without recursion.
    problem = _json_shape_problem(value, max_depth=max_depth, max_bytes=limit)
    if problem:
        return problem
    try:
        # Exactly what the database will be asked to store: strict JSON, valid UTF-8.
        size = len(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except ValueError as e:  # NaN/Infinity, or unpaired surrogates (UnicodeEncodeError)
        return f"must be plain JSON with finite numbers and valid unicode ({type(e).__name__})"
    if size > limit:
        return f"{size} bytes as JSON exceeds ingest.max_metadata_bytes = {limit}"
    return ""


def _json_shape_problem(value: Any, *, max_depth: int, max_bytes: int) -> str:  # Any: parsed JSON
    """Iteratively: "" if ``value`` nests at most ``max_depth`` deep and could fit ``max_bytes`` as JSON.

    The size is a lower bound of the encoded length (the exact check comes after, from
    code that may recurse); the walk stops as soon as either limit is passed.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    size = 0
    while stack:
        node, depth = stack.pop()
        if depth > max_depth and isinstance(node, (dict, list)):
            return f"nested deeper than ingest.max_metadata_depth = {max_depth} levels"
        if isinstance(node, dict):
            size += 1 + 2 * len(node)  # braces, and at least a colon and a comma or brace per key
            for k, v in node.items():
                size += len(k) + 2
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            size += 1 + max(1, len(node))
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            size += len(node) + 2
        else:
            size += 1
        if size > max_bytes:
            return f"over ingest.max_metadata_bytes = {max_bytes} bytes as JSON"
    return ""


class _FieldErrors(Exception):
    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors


def _reference(  # Any: JSON
    index: int, item: dict[str, Any], settings: Settings, known: Collection[str]
) -> Reference:
    """A by-reference sample's own fields, checked before any lookup."""
    errors: list[tuple[str, str]] = []
    for key in sorted(str(k) for k in set(item) - REFERENCE_KEYS):
        hint = "a sample by prediction id carries no input" if key in INPUT_FIELDS.values() else "unknown field"
        errors.append((key, f"{hint}; a sample by reference has {sorted(REFERENCE_KEYS)}"))
    pid = item.get("prediction_id")
    problem = id_problem(pid)
    if problem:
        errors.append(("prediction_id", problem))
    errors += _id_label_metadata_errors(item, settings, known)
    if errors:
        raise _FieldErrors(errors)
    return Reference(index, pid, item["label"], item.get("id"), item.get("metadata"))


def _id_label_metadata_errors(
    item: dict[str, Any], settings: Settings, known: Collection[str]
) -> list[tuple[str, str]]:
    """What is wrong with the fields every sample has, by value or by reference: id, label, metadata."""
    errors: list[tuple[str, str]] = []
    sample_id = item.get("id")
    if sample_id is not None and (problem := id_problem(sample_id)):
        errors.append(("id", problem))
    label = item.get("label")
    if label is None:
        errors.append(("label", "missing"))
    elif problem := label_problem(label, settings.model, known):
        errors.append(("label", problem))
    meta = item.get("metadata")
    if meta is not None and (
        problem := _metadata_problem(meta, settings.ingest.max_metadata_bytes, settings.ingest.max_metadata_depth)
    ):
        errors.append(("metadata", problem))
    return errors


def _sample(item: Any, settings: Settings, source: str, known: Collection[str]) -> NewSample:  # Any: JSON value
    if not isinstance(item, dict):
        raise InputError("", "expected a sample object {id, label, x|image|text, metadata}")
    # Every field is checked so one response lists all that is wrong with the sample.
    errors: list[tuple[str, str]] = []
    unknown = sorted(str(k) for k in set(item) - SAMPLE_KEYS)
    for key in unknown:
        errors.append((key, f"unknown field; a sample has {sorted(SAMPLE_KEYS)}"))
    errors += _id_label_metadata_errors(item, settings, known)
    kind = settings.model.input.kind
    for other in (f for k, f in INPUT_FIELDS.items() if k != kind):
        if other in item:
            errors.append((other, f"this service takes {kind} inputs, not {other!r}"))
    decoded = None
    try:
        # Decoded to validate, then dropped: feedback stores the bytes, so one image is alive at a time.
        decoded = decode_input(
            item, settings.model.input, max_image_pixels=settings.ingest.max_image_pixels, keep_image=False
        )
    except InputError as e:
        errors.append((e.field, e.message))
    if errors or decoded is None:
        raise _FieldErrors(errors)
    label, sample_id = str(item["label"]), item.get("id")
    return NewSample(
        external_id=sample_id if sample_id is not None else derived_id(label, decoded.kind, decoded.payload),
        label=label,
        kind=decoded.kind,
        payload=decoded.payload,
        source=source,
        meta=item.get("metadata"),
    )
