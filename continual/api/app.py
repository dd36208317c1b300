"""The HTTP API v1 (FastAPI): the app, its middleware, and the routes of ``continual.api.routes``."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from continual.api import errors
from continual.api.auth import Auth
from continual.api.context import AppContext
from continual.api.routes import admin, feedback, labelqueue, models, predict, status
from continual.metrics import Metrics


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(title="continual", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.state.auth = Auth.from_settings(
        ctx.settings, salt=lambda: ctx.store.records.install_secret("token-fingerprint")
    )
    app.state.store_ping = status.StorePing(ctx.store.ping, ctx.settings.service.readyz_timeout_seconds)
    app.add_middleware(RequestMetrics, metrics=ctx.metrics)
    errors.install(app, ctx.metrics)
    for routes in (status, feedback, predict, models, admin, labelqueue):
        app.include_router(routes.router)
    return app


# -- request latency --------------------------------------------------------------
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware: one latency observation per request, labelled by route template (bounded)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router stores the matched route in the scope; raw paths would be unbounded labels.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.http_request_duration.labels(route=route, method=method, status=str(status)).observe(
                time.perf_counter() - start
            )
