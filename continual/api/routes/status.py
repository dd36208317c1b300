"""``GET /v1/status``, the probes ``/healthz`` and ``/readyz``, and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from continual.api.auth import require
from continual.api.routes import Ctx
from continual.metrics import CONTENT_TYPE_LATEST
from continual.status import collect_status

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(ctx: Ctx) -> JSONResponse:
    store_ok = ctx.store.ping()
    ctx.metrics.store_up.set(1 if store_ok else 0)
    model_ok = ctx.serving.loaded() if ctx.serving is not None else True
    ready = store_ok and model_ok
    return JSONResponse({"ready": ready, "store": store_ok, "model": model_ok}, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(ctx: Ctx) -> Response:
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/status", dependencies=[require("ingest")])
def status(ctx: Ctx) -> dict[str, Any]:
    serving = ctx.serving.version() if ctx.serving is not None else None
    return collect_status(ctx.settings, ctx.store, {"state": ctx.state(), "serving_version": serving})
