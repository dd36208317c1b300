"""Which PostgreSQL server the tests use, if any (no tests here).

``CONTINUAL_TEST_PG_URL`` names one explicitly (then it must answer: a broken
explicit URL fails the tests instead of skipping them). Without it, a server
answering on 127.0.0.1:5432 (trust auth, database ``test``, as CI starts it) is
found with a socket connect and a real ``SELECT 1``; ``CONTINUAL_TEST_PG_URL=off``
turns that off. With no server, the PostgreSQL cases are still collected and
show as skipped with :data:`PG_SKIP_REASON`.
"""

from __future__ import annotations

import os
import socket

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def find_server(env: str | None = None, default: str = DEFAULT_PG_URL) -> tuple[str, str]:
    """``(url, "")`` for a usable server, ``("", why not)`` otherwise."""
    if env is None:
        env = os.environ.get("CONTINUAL_TEST_PG_URL", "")
    if env == "off":
        return "", "CONTINUAL_TEST_PG_URL=off"
    if env:
        return env, ""
    url = make_url(default)
    try:
        with socket.create_connection((url.host, url.port), timeout=0.5):
            pass
    except OSError as e:
        return "", f"CONTINUAL_TEST_PG_URL is not set and nothing answers on {url.host}:{url.port} ({e})"
    engine = create_engine(default, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
    except Exception as e:  # any failure means "not usable here": say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return "", f"CONTINUAL_TEST_PG_URL is not set and {default} refused SELECT 1 ({first})"
    finally:
        engine.dispose()
    return default, ""


PG_URL, PG_SKIP_REASON = find_server()


def require_pg() -> str:
    """The server's URL, or skip the calling test with the reason there is none."""
    if not PG_URL:
        import pytest

        pytest.skip(f"no PostgreSQL: {PG_SKIP_REASON}")
    return PG_URL


def pg_schema_url(schema: str) -> str:
    """The test server's URL with every connection's search_path set to ``schema``."""
    return (
        make_url(require_pg())
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
