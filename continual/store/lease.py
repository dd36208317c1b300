"""Named lease rows with an expiry: at most one holder at a time, on SQLite and PostgreSQL.

The holder renews before ``expires_at``; a crashed holder's lease simply expires.
Acquiring is one conditional UPDATE (or an INSERT for a lease never taken), so two
processes racing for it cannot both win.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from continual.store.engine import read_tx, write_tx
from continual.store.schema import leases


class Leases:
    """The ``leases`` table; bound to one engine (``store.leases``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def try_acquire(self, name: str, holder: str, ttl_seconds: float, *, now: datetime | None = None) -> bool:
        """Take or renew the lease; True if ``holder`` holds it until now + ttl."""
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        now = now or datetime.now(UTC)
        expires = now + timedelta(seconds=ttl_seconds)
        try:
            with write_tx(self.engine) as conn:
                taken = conn.execute(
                    update(leases)
                    .where(leases.c.name == name, or_(leases.c.holder == holder, leases.c.expires_at < now))
                    .values(holder=holder, expires_at=expires)
                ).rowcount
                if taken:
                    return True
                if conn.execute(select(leases.c.name).where(leases.c.name == name)).first() is not None:
                    return False
                conn.execute(insert(leases).values(name=name, holder=holder, expires_at=expires))
                return True
        except IntegrityError:  # another process inserted the first row at the same moment
            return False

    def release(self, name: str, holder: str) -> None:
        with write_tx(self.engine) as conn:
            conn.execute(
                update(leases)
                .where(leases.c.name == name, leases.c.holder == holder)
                .values(expires_at=datetime(1970, 1, 1, tzinfo=UTC))
            )

    def holder_of(self, name: str, *, now: datetime | None = None) -> str | None:
        """The current holder, or None when free or expired."""
        now = now or datetime.now(UTC)
        with read_tx(self.engine) as conn:
            row = conn.execute(select(leases).where(leases.c.name == name)).first()
        if row is None:
            return None
        expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
        return row.holder if expires >= now else None
