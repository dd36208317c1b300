"""The HTTP API v1 (FastAPI): routes, auth, error mapping, /metrics, health."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from continual.config import Settings
from continual.metrics import CONTENT_TYPE_LATEST, Metrics
from continual.status import collect_status
from continual.store import Store, StoreUnavailable

log = logging.getLogger("continual.api")


@dataclass
class AppContext:
    """Everything the routes use, built once by the service and passed in."""

    settings: Settings
    store: Store
    metrics: Metrics
    extras: dict[str, Any] = field(default_factory=dict)


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "details"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers or {}


def error_response(err: ApiError) -> JSONResponse:
    body = {"error": {"code": err.code, "message": err.message, "details": err.details}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(title="continual", version="1", docs_url=None, redoc_url=None)
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_request: Request, err: StoreUnavailable) -> JSONResponse:
        return error_response(ApiError(503, "store_unavailable", str(err), headers={"Retry-After": "5"}))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        store_ok = ctx.store.ping()
        ctx.metrics.store_up.set(1 if store_ok else 0)
        model_ok = bool(ctx.extras.get("model_loaded", lambda: True)())
        ready = store_ok and model_ok
        return JSONResponse({"ready": ready, "store": store_ok, "model": model_ok}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return collect_status(ctx.settings, ctx.store)

    return app
