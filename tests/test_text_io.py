"""Text in and out: CSV and JSON Lines importers, the client's text_sample, and the drift check's token statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from ingestutil import make_client

from continual.cli.ingest import send_all
from continual.client import Client, text_sample
from continual.config import settings_from_dict
from continual.drift.check import window_text_stats
from continual.drift.windows import read_window
from continual.ingest import feedback_samples
from continual.ingest.importers import Item, Skipped, open_source
from continual.store import Store


def _settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return settings_from_dict(
        {
            "service": {"data_dir": str(tmp_path / "data")},
            "auth": {"enabled": False},
            "model": {"architecture": "minilm", "classes": ["games", "science"], "input": {"kind": "text"}},
        }
    )


def test_client_text_sample_is_what_feedback_takes(tmp_path: Path) -> None:
    sample = text_sample("a puzzle game", "games", id="p1", metadata={"source": "apt"})
    assert sample == {"label": "games", "text": "a puzzle game", "id": "p1", "metadata": {"source": "apt"}}
    (row,) = feedback_samples({"samples": [sample]}, _settings(tmp_path))
    assert (row.external_id, row.payload, row.meta) == ("p1", b"a puzzle game", {"source": "apt"})
    with pytest.raises(TypeError, match="must be a str"):
        text_sample(b"bytes", "games")  # type: ignore[arg-type]


def test_csv_with_a_text_column_sends_the_rest_as_metadata(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "package"])
        w.writerow(["a", "space, the final frontier, in a game", "games", "spacegame"])
        w.writerow(["", "DNA sequence alignment", "science", ""])
        w.writerow(["", "   ", "science", "x"])
    got = list(open_source(path).items)
    assert isinstance(got[0], Item) and got[0].sample == {
        "label": "games",
        "text": "space, the final frontier, in a game",
        "metadata": {"package": "spacegame"},
        "id": "a",
    }
    assert isinstance(got[1], Item) and got[1].sample["id"].startswith("csv:d.csv:3:")
    assert "metadata" not in got[1].sample
    assert isinstance(got[2], Skipped) and got[2].reason == "empty 'text' column"
    # The same file again: the same ids (a re-import is all duplicates).
    assert [i.sample["id"] for i in open_source(path).items if isinstance(i, Item)] == [
        i.sample["id"] for i in got[:2] if isinstance(i, Item)
    ]


def test_jsonl_is_imported_end_to_end_and_a_reimport_is_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [
        {"text": "a card game", "label": "games", "id": "g1"},
        {"text": "plots for physics", "label": "science", "section": "science", "metadata": {"by": "me"}},
        "not an object",
        {"text": "", "label": "games"},
        {"text": "x", "label": "music"},  # not a configured class: the service refuses it
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n{broken\n", encoding="utf-8")
    src = open_source(path)
    assert (src.kind, src.total) == ("jsonl", 6)
    got = list(src.items)
    assert got[1].sample["metadata"] == {"by": "me", "section": "science"}  # type: ignore[union-attr]
    assert [g.reason for g in got if isinstance(g, Skipped)] == [
        "expected a JSON object {text, label, id}",
        "missing or empty 'text'",
        got[-1].reason,  # type: ignore[union-attr]
    ]
    assert got[-1].reason.startswith("not JSON")  # type: ignore[union-attr]
    http, store, _ = make_client(_settings(tmp_path), f"sqlite:///{tmp_path / 's.db'}")
    try:
        client = Client(str(http.base_url), http=http, retries=0)
        first = send_all(open_source(path).items, client, batch_size=10)
        assert (first.accepted, first.duplicates) == (2, 0) and store.count() == 2
        assert any("music" in why for _, why in first.rejected)
        second = send_all(open_source(path).items, client, batch_size=10)
        assert (second.accepted, second.duplicates) == (0, 2)
    finally:
        store.dispose()


def test_drift_reports_unknown_token_rate_and_length_per_window(tmp_path: Path, store: Store) -> None:
    s = _settings(tmp_path)
    plain = [{"label": "games", "text": f"a simple game number {i}"} for i in range(5)]
    odd = [{"label": "games", "text": f"\u13a0\u13a1\u13a2 {i} \u13a3"} for i in range(5)]  # Cherokee: [UNK]
    store.insert(feedback_samples({"samples": plain}, s))
    store.insert(feedback_samples({"samples": odd}, s))
    ref = read_window(store, store.newest(100, after=0)[:5])
    cur = read_window(store, store.newest(100, after=5))
    r, c = window_text_stats(store, ref, s.model.input), window_text_stats(store, cur, s.model.input)
    assert r["texts"] == c["texts"] == 5
    assert r["unknown_token_rate"] == 0.0 and c["unknown_token_rate"] > 0.3
    assert r["mean_tokens"] == pytest.approx(5.0)  # a simple game number N
    assert r["truncated_rate"] == c["truncated_rate"] == 0.0
