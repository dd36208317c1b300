"""``GET /v1/status``, the probes ``/healthz`` and ``/readyz``, and ``/metrics``.

The probes are ``async`` and take no dependency that FastAPI would run in a thread:
they answer from the event loop even while every request thread is busy, and the
store ping of ``/readyz`` has a thread of its own (:class:`StorePing`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from continual.api.auth import require
from continual.api.context import AppContext
from continual.api.routes import Ctx
from continual.metrics import CONTENT_TYPE_LATEST
from continual.status import collect_status

router = APIRouter()
log = logging.getLogger("continual.api")


class StorePing:
    """The store ping of ``/readyz``: in its own daemon thread, one at a time, awaited at most ``timeout`` seconds.

    A ping still running when the next probe comes is awaited again rather than
    doubled, so a store that hangs holds one thread, never the request pool.
    """

    def __init__(self, ping: Callable[[], bool], timeout: float) -> None:
        self._ping, self.timeout = ping, timeout
        self._pending: Future[bool] | None = None

    def _start(self) -> Future[bool]:
        fut: Future[bool] = Future()

        def run() -> None:
            try:
                fut.set_result(bool(self._ping()))
            except Exception as e:
                fut.set_exception(e)

        threading.Thread(target=run, name="continual-readyz-ping", daemon=True).start()
        return fut

    async def __call__(self) -> bool:
        fut = self._pending
        if fut is None or fut.done():
            fut = self._pending = self._start()
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.timeout)
        except TimeoutError:
            return False
        except Exception as e:
            log.warning("store ping failed: %s", e)
            return False


def _ctx(request: Request) -> AppContext:
    # Not the ``Ctx`` dependency: FastAPI runs plain-function dependencies in the thread pool.
    ctx: AppContext = request.app.state.ctx
    return ctx


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    ctx = _ctx(request)
    store_ok = await request.app.state.store_ping()
    ctx.metrics.store_up.set(1 if store_ok else 0)
    model_ok = ctx.serving.loaded() if ctx.serving is not None else True
    ready = store_ok and model_ok
    body: dict[str, object] = {"ready": ready, "store": store_ok, "model": model_ok}
    failure = ctx.serving.load_failure() if ctx.serving is not None else None
    if failure is not None:
        # Still ready when an older model serves: but say which champion this process could not load.
        body["champion_not_loaded"] = failure.to_dict()
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(ctx: Ctx) -> Response:
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/status", dependencies=[require("ingest")])
def status(ctx: Ctx) -> dict[str, Any]:
    serving = ctx.serving.version() if ctx.serving is not None else None
    return collect_status(ctx.settings, ctx.store, {"state": ctx.state(), "serving_version": serving})
