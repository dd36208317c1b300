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


def test_retention_never_marks_a_champion_and_a_marked_version_is_never_promoted(store: Store) -> None:
    add(store, "a"), add(store, "b"), add(store, "c")
    store.versions.move("a", expected=None, reason="import")
    # A listing taken before "a" was promoted would name it: the store still refuses.
    assert store.versions.mark_deleted(["a", "b"]) == ["b"]
    assert store.versions.champion_version() == "a"
    with pytest.raises(VersionNotFound, match="deleted"):
        store.versions.move("b", expected="a", reason="manual")
    assert store.versions.mark_deleted(["b"]) == []  # already deleted: nothing to do


def _hammer(url: str, versions: list[str], seconds: float, seed: int) -> None:
    """Runs in a child process: promote a random other version or roll back, from whatever it reads."""
    import random
    import time

    from continual.store import NoPreviousChampion

    store = Store(url)
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            current = store.versions.champion()
            try:
                if current is not None and current.previous is not None and rng.random() < 0.3:
                    store.versions.move(current.previous, expected=current.version, reason="rollback")
                else:
                    target = rng.choice([v for v in versions if current is None or v != current.version])
                    store.versions.move(target, expected=current.version if current else None, reason="manual")
            except (ChampionMoved, NoPreviousChampion):
                pass
    finally:
        store.dispose()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_processes_hammering_promote_and_rollback_leave_one_champion_and_a_chain(pg_url: str) -> None:
    import multiprocessing

    url = pg_url
    store = Store(url)
    store.upgrade()
    versions = [add(store, f"v{i}") for i in range(5)]
    ctx = multiprocessing.get_context("fork")  # each child opens its own engine
    procs = [ctx.Process(target=_hammer, args=(url, versions, 30.0, seed)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    history = list(reversed(store.versions.history()))  # oldest first
    assert len(history) > 100, f"only {len(history)} moves in 30 s: the processes did not contend"
    # A chain: every move names the champion the one before it made. Two moves that read the
    # same champion and both committed would record the same ``previous`` and break it.
    broken = [i for i in range(1, len(history)) if history[i]["previous"] != history[i - 1]["version"]]
    assert not broken, [history[i] for i in broken[:3]]
    assert [v["version"] for v in store.versions.rows() if v["status"] == "champion"] == [history[-1]["version"]]
    store.dispose()
