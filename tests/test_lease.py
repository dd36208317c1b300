from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from testkit import wait_for

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


def test_hosts_with_wrong_clocks_still_agree_because_the_database_keeps_the_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One host's clock an hour fast, another's an hour slow: neither steals nor hoards the lease."""
    import time

    real = datetime

    class Skewed(datetime):
        offset = timedelta(0)

        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            return real.now(tz) + cls.offset

    import continual.store.lease as lease_module

    monkeypatch.setattr(lease_module, "datetime", Skewed)
    Skewed.offset = timedelta(hours=-1)  # a slow host takes the lease ...
    assert store.leases.try_acquire("trainer", "slow-host", 1.5)
    Skewed.offset = timedelta(hours=1)  # ... a fast host cannot take it while it runs
    assert not store.leases.try_acquire("trainer", "fast-host", 1.5)
    assert store.leases.holder_of("trainer") == "slow-host"
    time.sleep(2.0)  # real time: the lease ran out by the database's clock
    assert store.leases.try_acquire("trainer", "fast-host", 1.5)
    Skewed.offset = timedelta(hours=-1)
    assert not store.leases.try_acquire("trainer", "slow-host", 1.5)  # nor the slow one, from the fast one


def test_expiry_on_the_real_clock(store: Store) -> None:
    """No injected clock: a renewed lease stays, an abandoned one frees itself after its TTL (and not before).

    The bounds leave a second of slack for a store clock with one-second resolution.
    """
    ttl = 2.0
    leases = store.leases
    assert leases.try_acquire("trainer", "a", ttl)
    # Renewed more often than the TTL, for longer than the TTL: nobody else gets it.
    until = time.monotonic() + ttl + 0.5
    while time.monotonic() < until:
        assert not leases.try_acquire("trainer", "b", ttl)
        assert leases.try_acquire("trainer", "a", ttl)
        time.sleep(0.3)
    # a stops renewing (it crashed): b takes over once the TTL has run out.
    abandoned = time.monotonic()
    wait_for(lambda: leases.try_acquire("trainer", "b", ttl), ttl + 3, "the abandoned lease expiring", 0.05)
    waited = time.monotonic() - abandoned
    assert waited >= ttl - 1.05, f"b took the lease {waited:.2f} s after a's last renewal (TTL {ttl} s)"
    assert leases.holder_of("trainer") == "b"
    assert not leases.try_acquire("trainer", "a", ttl)
