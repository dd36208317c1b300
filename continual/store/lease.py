"""Named lease rows with an expiry: at most one holder at a time, on SQLite and PostgreSQL.

The holder renews before ``expires_at``; a crashed holder's lease simply expires.
Acquiring is one conditional UPDATE (or an INSERT for a lease never taken), so two
processes racing for it cannot both win. Every time is the *database's* clock
(``now()`` on PostgreSQL, ``'now'`` on SQLite): hosts whose clocks disagree still
agree on who holds the lease and when it expires.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, Interval, bindparam, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from continual.store.engine import read_tx, write_tx
from continual.store.schema import leases

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def db_clock(conn: Connection, seconds: float = 0.0) -> ColumnElement[datetime]:
    """The database's current time, plus ``seconds``."""
    if conn.dialect.name == "sqlite":
        # The format SQLAlchemy stores DateTime in on SQLite (UTC, fractional seconds): comparable as text.
        return func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{seconds:+.3f} seconds")  # type: ignore[no-any-return]
    if not seconds:
        return func.now()  # type: ignore[no-any-return]
    return func.now() + bindparam(None, timedelta(seconds=seconds), type_=Interval, unique=True)  # type: ignore[no-any-return]


class Leases:
    """The ``leases`` table; bound to one engine (``store.leases``).

    ``now`` (tests only) replaces the database's clock with a given time.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def try_acquire(self, name: str, holder: str, ttl_seconds: float, *, now: datetime | None = None) -> bool:
        """Take or renew the lease; True if ``holder`` holds it until the database's now + ttl."""
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        try:
            with write_tx(self.engine) as conn:
                current = db_clock(conn) if now is None else literal(now)
                expires = db_clock(conn, ttl_seconds) if now is None else literal(now + timedelta(seconds=ttl_seconds))
                taken = conn.execute(
                    update(leases)
                    .where(leases.c.name == name, or_(leases.c.holder == holder, leases.c.expires_at < current))
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
                update(leases).where(leases.c.name == name, leases.c.holder == holder).values(expires_at=_EPOCH)
            )

    def holder_of(self, name: str, *, now: datetime | None = None) -> str | None:
        """The current holder, or None when free or expired."""
        with read_tx(self.engine) as conn:
            current = db_clock(conn) if now is None else literal(now)
            return conn.execute(
                select(leases.c.holder).where(leases.c.name == name, leases.c.expires_at >= current)
            ).scalar_one_or_none()
