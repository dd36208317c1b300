"""GET /v1/models pages the champion history; /v1/status costs the same with 10,000 drift checks as with 10."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from ingestutil import make_client, vector_settings
from sqlalchemy import event

from continual.store import Store


def _versions(store: Store, n: int) -> list[str]:
    names = [f"v{i:04d}" for i in range(n)]
    current = None
    for name in names:
        store.versions.add(
            version=name,
            parent=None,
            architecture="mlp",
            created_at=datetime.now(UTC),
            data_cutoff=0,
            run_id=None,
            metrics={},
            manifest_sha256="0" * 64,
        )
        store.versions.move(name, expected=current, reason="manual")
        current = name
    return names


def test_the_history_is_paged(tmp_path: Path, store_url: str) -> None:
    client, store, _ = make_client(vector_settings(tmp_path), store_url)
    names = _versions(store, 120)
    first = client.get("/v1/models").json()
    assert first["history_total"] == 120 and len(first["history"]) == 50  # the default page
    assert first["history"][0]["version"] == names[-1]
    page = client.get("/v1/models", params={"history_limit": 30, "history_offset": 100}).json()
    assert [h["version"] for h in page["history"]] == list(reversed(names))[100:120]
    for bad in ({"history_limit": 0}, {"history_limit": 5000}, {"history_offset": -1}):
        r = client.get("/v1/models", params=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed", r.text


def _vm_steps(store: Store, call: object) -> int:
    """SQLite virtual-machine steps (in hundreds) spent on ``call()``: work done, whatever the machine's load."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    def on_checkout(dbapi_conn, _record, _proxy) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.set_progress_handler(count, 100)

    event.listen(store.engine, "checkout", on_checkout)
    store.engine.dispose()  # pooled connections get the handler at their next checkout
    try:
        call()  # type: ignore[operator]
    finally:
        event.remove(store.engine, "checkout", on_checkout)
    return steps[0]


def test_status_does_not_slow_down_as_drift_checks_pile_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    client, store, _ = make_client(vector_settings(tmp_path), url)

    def add_checks(n: int) -> None:
        for _ in range(n):
            store.records.add_drift_check(
                champion=None, detected=False, n_reference=1, n_current=1, duration_seconds=0.1, results={"r": [1] * 20}
            )

    add_checks(10)
    few = _vm_steps(store, lambda: client.get("/v1/status").raise_for_status())
    add_checks(9_990)
    many = _vm_steps(store, lambda: client.get("/v1/status").raise_for_status())
    assert many <= few * 1.2 + 5, f"status did {many} x100 SQLite steps with 10,000 drift checks, {few} with 10"


@pytest.mark.parametrize("rows", [10_000])
def test_the_history_endpoint_reads_one_page_not_the_whole_history(tmp_path: Path, rows: int) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    client, store, _ = make_client(vector_settings(tmp_path), url)
    _versions(store, 10)
    small = _vm_steps(store, lambda: client.get("/v1/models", params={"history_limit": 5}).raise_for_status())
    store.records.add_event("x", "y")
    _versions_more = [f"w{i:05d}" for i in range(rows)]
    with store.engine.begin() as conn:  # a long history, written in one go
        from continual.store.schema import champion_history

        conn.execute(
            champion_history.insert(),
            [
                {
                    "version": "v0009",
                    "previous": "v0008",
                    "promoted_at": datetime.now(UTC),
                    "reason": "manual",
                    "actor": "",
                }
                for _ in _versions_more
            ],
        )
    large = _vm_steps(store, lambda: client.get("/v1/models", params={"history_limit": 5}).raise_for_status())
    # The count of the history grows with it (one index scan); the page itself does not.
    assert large <= small + rows // 100 * 2 + 50, (small, large)
