"""Bearer-token auth: scopes, token files, open endpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ingestutil import make_client, vector_settings

from continual.api.auth import Auth, require
from continual.config import ConfigError

AUTH = {"enabled": True, "ingest_tokens": ["ing-token"], "admin_tokens": ["adm-token"]}
BODY = json.dumps({"samples": [{"label": "cat", "x": [1, 2, 3, 4]}]}).encode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@pytest.fixture
def authed(tmp_path: Path):  # type: ignore[no-untyped-def]
    client, store, metrics = make_client(vector_settings(tmp_path, auth=AUTH), f"sqlite:///{tmp_path / 'store.db'}")

    # An admin-only route, as the admin routes of other parts declare it.
    @client.app.post("/v1/_admin_probe", dependencies=[require("admin")])
    def _probe() -> dict[str, bool]:
        return {"ok": True}

    return client, store, metrics


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer"}, "missing bearer token"),
        ({"Authorization": "Basic aW5nLXRva2Vu"}, "missing bearer token"),
        ({"Authorization": "Bearer wrong"}, "unknown token"),
        ({"Authorization": "Bearer ing-token-and-more"}, "unknown token"),
    ],
)
def test_missing_or_unknown_token_is_401(authed, headers: dict[str, str], message: str) -> None:  # type: ignore[no-untyped-def]
    client, store, metrics = authed
    r = client.post("/v1/feedback", content=BODY, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized" and message in r.json()["error"]["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert store.count() == 0
    assert metrics.registry.get_sample_value("continual_feedback_rejected_total", {"reason": "auth"}) == 1
    assert client.get("/v1/status", headers=headers).status_code == 401


def test_ingest_token_cannot_use_admin_routes(authed) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = authed
    r = client.post("/v1/_admin_probe", headers=bearer("ing-token"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert "'admin'" in r.json()["error"]["message"]
    assert client.post("/v1/_admin_probe", headers=bearer("adm-token")).json() == {"ok": True}


def test_admin_implies_ingest(authed) -> None:  # type: ignore[no-untyped-def]
    client, store, _ = authed
    assert client.post("/v1/feedback", content=BODY, headers=bearer("ing-token")).status_code == 200
    assert client.post("/v1/feedback", content=BODY, headers=bearer("adm-token")).json()["duplicates"] == 1
    assert client.get("/v1/status", headers=bearer("ing-token")).status_code == 200
    assert client.get("/v1/status", headers=bearer("adm-token")).status_code == 200
    assert store.count() == 1


def test_auth_comes_before_reading_the_body(authed) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = authed
    r = client.post("/v1/feedback", content=b"not json", headers={"Content-Type": "text/plain"})
    assert r.status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_and_metrics_are_open(authed, path: str) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = authed
    assert client.get(path).status_code == 200


def test_disabled_auth_needs_no_token(tmp_path: Path) -> None:
    client, store, _ = make_client(vector_settings(tmp_path), f"sqlite:///{tmp_path / 'store.db'}")
    r = client.post("/v1/feedback", content=BODY, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and store.count() == 1


def test_tokens_from_files_in_the_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ingest").write_text("# rotated 2026-01\nold-token\n\n  new-token  \n")
    (creds / "admin").write_text("root-token\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = vector_settings(tmp_path, auth={"enabled": True, "ingest_tokens_file": "ingest", "admin_tokens_file": "admin"})
    auth = Auth.from_settings(s)
    assert auth.scopes("old-token") == auth.scopes("new-token") == {"ingest"}
    assert auth.scopes("root-token") == {"ingest", "admin"}
    assert auth.scopes("# rotated 2026-01") == auth.scopes("") == frozenset()


def test_a_missing_token_file_stops_app_creation(tmp_path: Path) -> None:
    s = vector_settings(tmp_path, auth={"enabled": True, "ingest_tokens_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="nope"):
        make_client(s, f"sqlite:///{tmp_path / 'store.db'}")


def test_enabled_auth_without_tokens_refuses_everyone(tmp_path: Path) -> None:
    s = vector_settings(tmp_path, auth={"enabled": True})
    client, _, _ = make_client(s, f"sqlite:///{tmp_path / 'store.db'}")
    assert client.post("/v1/feedback", content=BODY, headers=bearer("")).status_code == 401
    assert client.post("/v1/feedback", content=BODY, headers=bearer("anything")).status_code == 401
