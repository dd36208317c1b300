"""The champion pointer in the store: one query reads it, moves are compare-and-swap, serialised in the database."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from continual.store import ChampionMoved, Store, VersionNotFound


def add(store: Store, version: str, cutoff: int = 0) -> str:
    assert store.versions.add(
        version=version,
        parent=None,
        architecture="mlp",
        created_at=datetime.now(UTC),
        data_cutoff=cutoff,
        run_id=None,
        metrics={},
        manifest_sha256="0" * 64,
    )
    return version


def test_the_champion_joins_its_version_row(store: Store) -> None:
    assert store.versions.champion() is None and store.versions.champion_version() is None
    add(store, "a", cutoff=17)
    assert store.versions.move("a", expected=None, reason="import", actor="cli:me")
    c = store.versions.champion()
    assert c is not None
    assert (c.version, c.previous, c.reason, c.actor, c.data_cutoff, c.architecture) == (
        "a",
        None,
        "import",
        "cli:me",
        17,
        "mlp",
    )


def test_a_stale_expectation_fails_by_name_and_changes_nothing(store: Store) -> None:
    add(store, "a"), add(store, "b"), add(store, "c")
    store.versions.move("a", expected=None, reason="import")
    store.versions.move("b", expected="a", reason="gate")
    with pytest.raises(ChampionMoved) as e:
        store.versions.move("c", expected="a", reason="gate")  # the caller still thinks "a" serves
    assert (e.value.expected, e.value.actual, e.value.version) == ("a", "b", "c")
    assert store.versions.champion_version() == "b"
    assert [h["version"] for h in store.versions.history()] == ["b", "a"]
    assert {v["version"]: v["status"] for v in store.versions.rows()} == {
        "a": "retired",
        "b": "champion",
        "c": "candidate",
    }
    with pytest.raises(ChampionMoved):
        store.versions.move("c", expected=None, reason="import")  # "none yet" is an expectation too


def test_moving_to_the_champion_records_nothing(store: Store) -> None:
    add(store, "a")
    assert store.versions.move("a", expected=None, reason="import")
    assert not store.versions.move("a", expected="a", reason="manual")
    assert store.versions.history_size() == 1


def test_unknown_and_deleted_versions_are_refused(store: Store) -> None:
    add(store, "a"), add(store, "gone")
    with pytest.raises(VersionNotFound, match="not registered"):
        store.versions.move("nope", expected=None, reason="manual")
    store.versions.mark_deleted(["gone"])
    with pytest.raises(VersionNotFound, match="deleted"):
        store.versions.move("gone", expected=None, reason="manual")
    assert store.versions.champion() is None


def test_concurrent_moves_from_one_champion_let_exactly_one_win(store: Store) -> None:
    add(store, "base")
    store.versions.move("base", expected=None, reason="import")
    contenders = [add(store, f"v{i}") for i in range(8)]
    start = threading.Barrier(len(contenders))
    won: list[str] = []
    lost: list[str] = []

    def promote(version: str) -> None:
        start.wait()
        try:
            store.versions.move(version, expected="base", reason="gate")
            won.append(version)
        except ChampionMoved:
            lost.append(version)

    threads = [threading.Thread(target=promote, args=(v,)) for v in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(lost) == len(contenders) - 1, (won, lost)
    assert store.versions.champion_version() == won[0]
    history = store.versions.history()
    assert [h["previous"] for h in history] == ["base", None]
    assert [v["version"] for v in store.versions.rows() if v["status"] == "champion"] == won
