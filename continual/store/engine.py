"""Engine setup: SQLite pragmas and write transactions that take the lock up front."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or is locked for too long; retry later."""


def make_engine(url: str, *, busy_timeout_ms: int = 5_000, pool_size: int = 8) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_ms)
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


def _sqlite_engine(url: str, busy_timeout_ms: int) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        pool_pre_ping=False,
        # Connections are in driver autocommit mode between our explicit BEGIN/COMMIT,
        # so there is nothing to roll back when one returns to the pool.
        pool_reset_on_return=None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:  # Any: the DB-API driver's own connection types
        # Let SQLAlchemy's begin event emit BEGIN itself (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that reads and then writes can fail with
        # SQLITE_BUSY without waiting when another writer committed in between;
        # writers take the lock at BEGIN so busy_timeout applies.
        if conn.get_execution_options().get("write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A transaction for writing; commits on success, rolls back on error."""
    with translate_errors(), engine.execution_options(write=True).begin() as conn:
        yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    with translate_errors(), engine.connect() as conn, conn.begin():
        yield conn


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map connection loss, lock timeouts and read-only files to StoreUnavailable."""
    try:
        yield
    except OperationalError as e:
        raise StoreUnavailable(f"store unavailable: {_first_line(e)}") from e
    except DBAPIError as e:
        if e.connection_invalidated:
            raise StoreUnavailable(f"store connection lost: {_first_line(e)}") from e
        raise


def _first_line(e: Exception) -> str:
    text = str(getattr(e, "orig", None) or e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__
