from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgutil import PG_SKIP_REASON, PG_URL, pg_schema_url, require_pg
from sqlalchemy import create_engine, text

# The PostgreSQL cases are always collected: without a server they show as skipped, with the reason.
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pytest_report_header() -> str:
    return f"postgresql: {PG_URL}" if PG_URL else f"postgresql: none, those cases skip ({PG_SKIP_REASON})"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards (skips, with the reason, when there is no server)."""
    url = require_pg()
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    """A fresh, empty PostgreSQL schema's URL (skips without a server)."""
    return pg_schema_url(pg_schema)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL for each backend under test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return pg_schema_url(request.getfixturevalue("pg_schema"))


@pytest.fixture
def store(store_url: str):  # type: ignore[no-untyped-def]
    from continual.store import Store

    s = Store(store_url, holdout_fraction=0.2)
    s.upgrade()
    yield s
    s.dispose()
