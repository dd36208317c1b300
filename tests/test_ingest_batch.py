from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ingestutil import b64, image_bytes, image_settings, vector_settings

from continual.config import ConfigError
from continual.ingest import (
    BatchTooLarge,
    DecodedTooLarge,
    MalformedBody,
    ValidationFailed,
    class_limit,
    derived_id,
    feedback_samples,
    parse_json,
)
from continual.store import ClassLimit, PayloadTooLarge, Store


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


def nested(depth: int, leaf: object = 0) -> object:
    """A list ``depth`` deep, built without recursion (what a parser hands over for [[[...]]])."""
    out = leaf
    for _ in range(depth):
        out = [out]
    return out


def test_deep_or_huge_metadata_and_labels_are_named_not_recursed_into(tmp_path: Path) -> None:
    s = vector_settings(tmp_path)
    ok = {"label": "cat", "x": [1, 2, 3, 4]}
    doc = {
        "samples": [
            ok,
            {**ok, "metadata": {"a": nested(100_000)}},  # far beyond any recursion limit
            {**ok, "label": nested(100_000, "cat")},
            {**ok, "metadata": {"a": [0] * 1_000_000}},
            {**ok, "metadata": {"a": nested(15)}},  # 16 levels with the object: the limit
            {**ok, "metadata": {"a": nested(16)}},
        ]
    }
    with pytest.raises(ValidationFailed) as e:
        feedback_samples(doc, s)
    got = {(d["index"], d["field"]): d["message"] for d in e.value.details}
    assert list(got) == [(1, "metadata"), (2, "label"), (3, "metadata"), (5, "metadata")], got
    assert "nested deeper than ingest.max_metadata_depth = 16" in got[(1, "metadata")]
    assert "expected a string" in got[(2, "label")]
    assert "ingest.max_metadata_bytes = 65536" in got[(3, "metadata")]


def test_the_pixel_budget_refuses_a_feedback_batch_before_decoding(tmp_path: Path) -> None:
    s = image_settings(tmp_path, ingest={"max_image_pixels": 100, "max_request_pixels": 250})
    sample = {"label": "cat", "image": b64(image_bytes(w=10, h=10))}
    assert len(feedback_samples({"samples": [sample, sample]}, s)) == 2
    with pytest.raises(DecodedTooLarge, match="300 pixels"):
        feedback_samples({"samples": [sample, sample, sample]}, s)
    # Vector services never look for images.
    assert len(feedback_samples({"samples": [{"label": "cat", "x": [0, 0, 0, 0]}] * 3}, vector_settings(tmp_path))) == 3


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
    # Pinned: sha256(b"cat" NUL b"vector" NUL float32 bytes of [1, 2, 3, 4]), computed once and kept.
    assert a.external_id == b.external_id == "sha256:a1f43793c5c10c8805b0db3757932657bc2e6126e7978fc4440edbbb0bd091fe"
    assert c.external_id != a.external_id


@pytest.mark.parametrize(
    ("label", "kind", "payload", "expected"),
    [
        (
            "cat",
            "vector",
            np.array([1, 2, 3, 4], "<f4").tobytes(),
            "a1f43793c5c10c8805b0db3757932657bc2e6126e7978fc4440edbbb0bd091fe",
        ),
        ("7", "image", b"\x89PNG", "78ff876131f0ff452af39e577cc0c4e7a8382bf56f6ab9dd7328886b0d37dc6b"),
        ("", "vector", b"", "9260b81cdbb41b64c2f776f9a9c7ff4caa38735f3945ccc16b49dabfdd3f705c"),
    ],
)
def test_derived_id_known_values(label: str, kind: str, payload: bytes, expected: str) -> None:
    """Ids already stored depend on these exact bytes: a changed separator or encoding is a breaking change."""
    assert derived_id(label, kind, payload) == "sha256:" + expected
    # The NUL separators keep label and kind apart: moving a character across the boundary changes the id.
    assert derived_id(label + "v", kind[1:], payload) != derived_id(label, kind, payload)


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


# -- new classes: [model] new_classes, max_classes, label_pattern, max_label_length ---------------------
def labelled(*labels: object) -> dict[str, object]:
    return {"samples": [{"id": f"n{i}", "label": label, "x": [0, 1, 2, 3]} for i, label in enumerate(labels)]}


def test_a_new_label_is_refused_by_default_and_says_how_to_accept_it(tmp_path: Path) -> None:
    s = vector_settings(tmp_path)
    assert s.model.new_classes == "refuse"
    with pytest.raises(ValidationFailed) as e:
        feedback_samples(labelled("cat", "fox"), s, known=["fox"])  # stored labels do not matter when refusing
    [detail] = e.value.details
    assert (detail["index"], detail["field"]) == (1, "label")
    assert "'fox' is not one of the configured classes" in detail["message"] and "new_classes" in detail["message"]
    assert class_limit(s.model) is None


def test_with_accept_a_new_label_that_follows_the_rules_is_stored(tmp_path: Path, store: Store) -> None:
    s = vector_settings(tmp_path, model={"new_classes": "accept", "max_classes": 6})
    rows = feedback_samples(labelled("cat", "red fox", "product/shoes-2", "café"), s)
    assert [r.label for r in rows] == ["cat", "red fox", "product/shoes-2", "café"]
    store.insert(rows, class_limit=class_limit(s.model))
    assert store.classes.names() == ["cat", "red fox", "product/shoes-2", "café"]


def test_new_labels_must_match_the_pattern_and_length(tmp_path: Path) -> None:
    s = vector_settings(tmp_path, model={"new_classes": "accept", "max_label_length": 8, "label_pattern": "[a-z]+"})
    with pytest.raises(ValidationFailed) as e:
        feedback_samples(labelled("fox", "Fox", "abcdefghi", "", 7, " fox"), s)
    messages = {d["index"]: d["message"] for d in e.value.details}
    assert set(messages) == {1, 2, 3, 4, 5}
    assert (
        "label_pattern" in messages[1]
        and "max_label_length = 8" in messages[2]
        and "expected a string (a class name), got a number" in messages[4]
    )
    # A configured class and a stored one pass whatever the rules say.
    s = vector_settings(tmp_path, model={"new_classes": "accept", "label_pattern": "[0-9]+"})
    assert len(feedback_samples(labelled("cat", "Old Label"), s, known=["Old Label"])) == 2


def test_max_classes_counts_configured_stored_and_new_labels(tmp_path: Path) -> None:
    s = vector_settings(tmp_path, model={"new_classes": "accept", "max_classes": 5})  # cat, dog, bird configured
    assert len(feedback_samples(labelled("fox", "owl", "fox"), s)) == 3  # exactly 5 classes
    with pytest.raises(ValidationFailed) as e:
        feedback_samples(labelled("fox", "owl", "emu", "emu", "cat"), s)
    assert [(d["index"], d["field"]) for d in e.value.details] == [(2, "label"), (3, "label")]
    assert "max_classes = 5" in e.value.details[0]["message"]
    # A stored label takes a place too.
    with pytest.raises(ValidationFailed):
        feedback_samples(labelled("fox", "owl"), s, known=["cat", "emu"])
    assert class_limit(s.model) == ClassLimit(5, ("cat", "dog", "bird"))


def test_max_classes_cannot_be_below_the_configured_classes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_classes = 2"):
        vector_settings(tmp_path, model={"max_classes": 2, "new_classes": "accept"})
    # Refusing new labels, the configured list is the bound (a 1000-class model needs no max_classes).
    assert vector_settings(tmp_path, model={"max_classes": 2}).model.most_classes == 3
    with pytest.raises(ConfigError, match="label_pattern"):
        vector_settings(tmp_path, model={"label_pattern": "[a-"})
