from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ingestutil import b64, image_bytes, image_settings, vector_settings

from continual.ingest import (
    BatchTooLarge,
    MalformedBody,
    ValidationFailed,
    derived_id,
    feedback_samples,
    parse_json,
)
from continual.store import PayloadTooLarge, Store


def fails(doc: object, settings) -> list[tuple[object, str]]:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationFailed) as e:
        feedback_samples(doc, settings)
    return [(d["index"], d["field"]) for d in e.value.details]


def test_valid_batch_becomes_store_rows(tmp_path: Path) -> None:
    s = vector_settings(tmp_path)
    rows = feedback_samples(
        {"samples": [{"id": "a", "label": "cat", "x": [1, 2, 3, 4], "metadata": {"src": "app"}}]}, s, source="api"
    )
    (row,) = rows
    assert (row.external_id, row.label, row.kind, row.source, row.meta) == ("a", "cat", "vector", "api", {"src": "app"})
    assert row.payload == np.array([1, 2, 3, 4], dtype="<f4").tobytes()


def test_every_bad_sample_and_field_is_named(tmp_path: Path) -> None:
    s = vector_settings(tmp_path)
    doc = {
        "samples": [
            {"label": "cat", "x": [1, 2, 3, 4]},
            {"label": "cow", "x": [1, 2, 3]},
            {"id": "", "label": "dog", "x": [1, 2, 3, 4], "lable": "x"},
            {"id": "x" * 256, "label": "dog", "x": [1, 2, 3, 4], "metadata": [1]},
            "not an object",
            {"label": "dog", "x": [1, 2, 3, 4], "image": "aGk="},
            {"x": [0, 0, 0, 0]},
        ]
    }
    assert fails(doc, s) == [
        (1, "label"),
        (1, "x"),
        (2, "lable"),
        (2, "id"),
        (3, "id"),
        (3, "metadata"),
        (4, ""),
        (5, "image"),
        (6, "label"),
    ]


@pytest.mark.parametrize(
    ("doc", "field"),
    [([], ""), ({}, "samples"), ({"samples": {}}, "samples"), ({"samples": [], "extra": 1}, "extra"), (3, "")],
)
def test_document_shape_errors(tmp_path: Path, doc: object, field: str) -> None:
    assert fails(doc, vector_settings(tmp_path)) == [(None, field)]


def test_empty_batch_is_fine(tmp_path: Path) -> None:
    assert feedback_samples({"samples": []}, vector_settings(tmp_path)) == []


def test_batch_limit(tmp_path: Path) -> None:
    s = vector_settings(tmp_path, ingest={"max_batch_samples": 2})
    with pytest.raises(BatchTooLarge, match=r"3 samples .*ingest.max_batch_samples = 2"):
        feedback_samples({"samples": [{"label": "cat", "x": [0, 0, 0, 0]}] * 3}, s)


def test_the_payload_limit_is_the_stores_and_names_each_sample(tmp_path: Path, store: Store) -> None:
    img = image_settings(tmp_path)
    small, big = image_bytes(w=2, h=2), image_bytes(w=64, h=64)
    capped = Store(store.url, max_payload_bytes=100)
    assert len(small) <= 100 < len(big)
    batch = feedback_samples(
        {"samples": [{"label": "cat", "image": b64(small)}, {"label": "cat", "image": b64(big)}]}, img
    )
    with pytest.raises(PayloadTooLarge) as e:
        capped.insert(batch)
    assert [(d["index"], d["field"]) for d in e.value.details] == [(1, "image")]
    assert capped.count() == 0
    capped.dispose()


def test_derived_ids_depend_on_label_and_content_only(tmp_path: Path) -> None:
    s = vector_settings(tmp_path)
    a, b, c = feedback_samples(
        {
            "samples": [
                {"label": "cat", "x": [1, 2, 3, 4], "metadata": {"n": 1}},
                {"label": "cat", "x": [1.0, 2.0, 3.0, 4.0], "metadata": {"n": 2}},
                {"label": "dog", "x": [1, 2, 3, 4]},
            ]
        },
        s,
    )
    assert a.external_id == b.external_id == derived_id("cat", "vector", a.payload)
    assert a.external_id.startswith("sha256:") and len(a.external_id) == 7 + 64
    assert c.external_id != a.external_id


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"1" * 5000, "JSON"),
    ],
)
def test_malformed_bodies(body: bytes, words: str) -> None:
    with pytest.raises(MalformedBody, match=words):
        parse_json(body)
