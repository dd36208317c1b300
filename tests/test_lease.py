from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from continual.store import Store


def test_one_holder_at_a_time_and_expiry(store: Store) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    assert store.leases.try_acquire("trainer", "a", 30, now=t0)
    assert not store.leases.try_acquire("trainer", "b", 30, now=t0 + timedelta(seconds=10))
    assert store.leases.try_acquire("trainer", "a", 30, now=t0 + timedelta(seconds=20))  # renew
    assert store.leases.holder_of("trainer", now=t0 + timedelta(seconds=45)) == "a"
    # a crashed: its lease expires and b takes over
    assert store.leases.try_acquire("trainer", "b", 30, now=t0 + timedelta(seconds=51))
    assert not store.leases.try_acquire("trainer", "a", 30, now=t0 + timedelta(seconds=52))
    store.leases.release("trainer", "b")
    assert store.leases.holder_of("trainer") is None
    assert store.leases.try_acquire("trainer", "a", 30)


def test_racing_holders_never_both_win(store: Store) -> None:
    for round_ in range(5):
        name = f"race-{round_}"
        wins: list[str] = []
        barrier = threading.Barrier(4)

        def contend(who: str, name: str = name, wins: list[str] = wins, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            if store.leases.try_acquire(name, who, 60):
                wins.append(who)

        threads = [threading.Thread(target=contend, args=(f"h{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, wins
        assert store.leases.holder_of(name) == wins[0]
