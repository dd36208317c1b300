"""Text inputs on the wire: feedback and predict take {"text": "..."}; every bad one is named by index and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ingestutil import make_client

from continual.config import Settings, settings_from_dict
from continual.ingest import ValidationFailed, derived_id, feedback_samples, parse_json
from continual.ingest.decode import decode_payload, predict_inputs
from continual.store import Store


def text_settings(tmp_path: Path, max_text_chars: int = 50) -> Settings:
    return settings_from_dict(
        {
            "service": {"data_dir": str(tmp_path)},
            "auth": {"enabled": False},
            "model": {
                "architecture": "minilm",
                "classes": ["games", "science"],
                "input": {"kind": "text", "max_text_chars": max_text_chars},
            },
        }
    )


def test_a_text_sample_is_stored_as_utf8_and_dedupes_by_content(tmp_path: Path, store: Store) -> None:
    s = text_settings(tmp_path)
    doc = {"samples": [{"label": "games", "text": "Spiel über Raumschiffe 🚀"}]}
    (row,) = feedback_samples(doc, s)
    assert (row.kind, row.payload) == ("text", "Spiel über Raumschiffe 🚀".encode())
    assert row.external_id == derived_id("games", "text", row.payload)
    assert decode_payload("text", row.payload).payload == row.payload
    first = store.insert([row])
    again = store.insert(feedback_samples(doc, s))
    assert (first.accepted, again.accepted, again.duplicates) == (1, 0, 1)


def test_the_api_answers_422_naming_index_and_field(tmp_path: Path, store_url: str) -> None:
    client, store, _metrics = make_client(text_settings(tmp_path), store_url)
    try:
        ok = client.post("/v1/feedback", json={"samples": [{"label": "games", "text": "a game"}]})
        assert ok.status_code == 200 and ok.json()["accepted"] == 1
        bad = client.post(
            "/v1/feedback", json={"samples": [{"label": "games", "text": "fine"}, {"label": "games", "text": ""}]}
        )
        assert bad.status_code == 422
        assert [(d["index"], d["field"]) for d in bad.json()["error"]["details"]] == [(1, "text")]
        assert store.count() == 1
    finally:
        store.dispose()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (42, "expected a string, got a number"),
        (None, "expected a string, got null"),
        (["a"], "expected a string, got a list"),
        ("", "empty text"),
        ("  \n\t", "only whitespace"),
        ("ab\x00c", "NUL character at character 2"),
        ("x" * 51, "51 characters exceeds \\[model.input\\] max_text_chars = 50"),
    ],
)
def test_a_bad_text_is_refused_naming_index_and_field(tmp_path: Path, text: object, why: str) -> None:
    s = text_settings(tmp_path)
    doc = {"samples": [{"label": "games", "text": "fine"}, {"label": "science", "text": text}]}
    with pytest.raises(ValidationFailed, match=why) as e:
        feedback_samples(doc, s)
    assert [(d["index"], d["field"]) for d in e.value.details] == [(1, "text")]


def test_a_lone_surrogate_from_a_json_escape_is_refused(tmp_path: Path) -> None:
    s = text_settings(tmp_path)
    # Legal JSON, not encodable as UTF-8: the stdlib parser lets it through, so validation must catch it.
    doc = parse_json(b'{"samples": [{"label": "games", "text": "half \\ud83d of an emoji"}]}')
    with pytest.raises(ValidationFailed, match="unpaired surrogate") as e:
        feedback_samples(doc, s)
    assert e.value.details[0]["index"] == 0 and e.value.details[0]["field"] == "text"


def test_the_text_is_exactly_at_the_limit_passes_and_other_inputs_are_named(tmp_path: Path) -> None:
    s = text_settings(tmp_path)
    assert feedback_samples({"samples": [{"label": "games", "text": "é" * 50}]}, s)[0].payload == ("é" * 50).encode()
    with pytest.raises(ValidationFailed) as e:
        feedback_samples({"samples": [{"label": "games", "x": [1, 2]}, {"label": "games", "image": "AAAA"}]}, s)
    fields = [(d["index"], d["field"]) for d in e.value.details]
    assert (0, "x") in fields and (0, "text") in fields and (1, "image") in fields
    assert "takes text inputs" in json.dumps(e.value.details)


def test_predict_inputs_take_text_and_refuse_bad_ones(tmp_path: Path) -> None:
    s = text_settings(tmp_path)
    spec = s.model.input
    ok = predict_inputs(
        {"inputs": [{"text": "a"}, {"text": "b c"}]}, spec, max_inputs=8, max_image_pixels=1, max_request_pixels=1
    )
    assert [d.payload for d in ok] == [b"a", b"b c"]
    with pytest.raises(ValidationFailed) as e:
        predict_inputs({"inputs": [{"text": "a"}, {"text": 3}, {}]}, spec, max_inputs=8, max_image_pixels=1,
                       max_request_pixels=1)  # fmt: skip
    assert [(d["index"], d["field"]) for d in e.value.details] == [(1, "text"), (2, "text")]
