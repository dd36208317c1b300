from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("CONTINUAL_TEST_PG_URL", "")
BACKENDS = ["sqlite", *(["postgresql"] if PG_URL else [])]


def pg_schema_url(schema: str) -> str:
    """The test server's URL with every connection's search_path set to ``schema``."""
    return (
        make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    )


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards (skips without CONTINUAL_TEST_PG_URL)."""
    if not PG_URL:
        pytest.skip("CONTINUAL_TEST_PG_URL is not set")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
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
