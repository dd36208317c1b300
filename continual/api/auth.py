"""Bearer tokens: one dependency, ``require("ingest" | "admin")``, on every /v1 route.

Admin tokens hold the ingest scope too. Tokens are compared in constant time with
every candidate, so timing tells nothing about which token almost matched.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, Request
from fastapi.params import Depends as DependsMarker

from continual.config import Settings

Scope = Literal["ingest", "admin"]


class Unauthorized(PermissionError):
    """No bearer token, or one no scope knows (401)."""


class Forbidden(PermissionError):
    """A known token without the scope the route needs (403)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        super().__init__(f"this token lacks the {scope!r} scope")


@dataclass(frozen=True)
class Auth:
    """Bearer tokens of both scopes, loaded once when the app is built."""

    enabled: bool
    ingest: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        return cls(
            enabled=settings.auth.enabled,
            ingest=tuple(t.encode() for t in sorted(settings.tokens("ingest"))),
            admin=tuple(t.encode() for t in sorted(settings.tokens("admin"))),
        )

    def scopes(self, token: str) -> frozenset[str]:
        """The scopes a token holds (admin implies ingest); empty for an unknown token."""
        raw = token.encode()
        admin, ingest = _matches_any(raw, self.admin), _matches_any(raw, self.ingest)
        return frozenset({"admin", "ingest"}) if admin else frozenset({"ingest"}) if ingest else frozenset()

    def check(self, authorization: str | None, scope: Scope) -> None:
        """Raise :class:`Unauthorized` or :class:`Forbidden`; pass when auth is disabled."""
        if not self.enabled:
            return
        kind, _, token = (authorization or "").partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        held = self.scopes(token.strip())
        if not held:
            raise Unauthorized("unknown token")
        if scope not in held:
            raise Forbidden(scope)


def _matches_any(token: bytes, candidates: tuple[bytes, ...]) -> bool:
    # Compare with every candidate, without stopping early, in constant time each.
    found = False
    for c in candidates:
        found |= hmac.compare_digest(token, c)
    return found


def require(scope: Scope) -> DependsMarker:
    """The route dependency: ``dependencies=[require("admin")]``."""

    def check(request: Request) -> None:
        request.app.state.auth.check(request.headers.get("authorization"), scope)

    return Depends(check)


def actor(request: Request) -> str:
    """Who acted, for the audit trail: a token fingerprint, never the token itself."""
    kind, _, token = (request.headers.get("authorization") or "").partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return "anonymous"
    return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:12]
