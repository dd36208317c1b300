"""The HTTP API v1: ``create_app(AppContext(...))``; routes in ``routes/``, auth in ``auth``, the error table in ``errors``."""

from __future__ import annotations

from continual.api.app import create_app
from continual.api.context import AppContext

__all__ = ["AppContext", "create_app"]
