"""The PostgreSQL cases never vanish: a server on 127.0.0.1:5432 is found, and without one they show as skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pgutil import PG_URL, find_server
from serverutil import free_port

TESTS = Path(__file__).parent


def test_find_server_explains_why_there_is_none() -> None:
    port = free_port()  # bound and released: nothing listens there
    url, why = find_server("", f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    assert url == "" and f"nothing answers on 127.0.0.1:{port}" in why
    assert find_server("off") == ("", "CONTINUAL_TEST_PG_URL=off")
    assert find_server("postgresql+psycopg://u@h/d") == ("postgresql+psycopg://u@h/d", "")


def test_a_server_answering_on_the_default_port_is_used() -> None:
    if os.environ.get("CONTINUAL_TEST_PG_URL"):
        return  # an explicit URL wins; nothing to detect
    url, why = find_server("")
    assert url == PG_URL, why  # conftest uses what detection found (or nothing, with the reason)


def test_without_a_server_postgresql_cases_are_collected_and_skipped_with_the_reason() -> None:
    env = {**os.environ, "CONTINUAL_TEST_PG_URL": "off"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-q", str(TESTS / "test_store.py"),
         "-k", "split_is_a_stable_function"],
        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    assert "1 passed, 1 skipped" in out, out
    assert "SKIPPED" in out and "no PostgreSQL: CONTINUAL_TEST_PG_URL=off" in out, out
