"""``POST /v1/train`` (ask for a gated run now) and ``POST /v1/samples/exclude`` (take feedback out of play)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from continual.api.auth import actor, require
from continual.api.body import read_body, require_json
from continual.api.context import AppContext
from continual.api.routes import Ctx
from continual.ingest import exclusion_request, parse_json
from continual.learn.run import request_run

router = APIRouter()
MAX_EXCLUDE_IDS = 10_000


@router.post("/v1/train", dependencies=[require("admin")], status_code=202)
def train(request: Request, ctx: Ctx) -> dict[str, Any]:
    """A pending run the trainer picks up at its next check (still gated); 409 while one is active."""
    run_id = request_run(ctx.store, ctx.settings, actor=actor(request))
    return {"run_id": run_id, "status": "pending"}


@router.post("/v1/samples/exclude", dependencies=[require("admin")])
async def exclude(request: Request, ctx: Ctx) -> dict[str, Any]:
    """Take poisoned or mislabeled feedback out of play by id (kept for the audit trail)."""
    require_json(request)
    body = await read_body(request, ctx.settings.ingest.max_body_bytes)
    # One hop to a worker thread: parsing, checking up to MAX_EXCLUDE_IDS ids and the transaction.
    changed, unknown = await run_in_threadpool(_exclude, body, ctx, actor(request))
    return {"excluded": changed, "unknown": unknown}


def _exclude(body: bytes, ctx: AppContext, who: str) -> tuple[int, list[str]]:
    req = exclusion_request(parse_json(body), max_ids=MAX_EXCLUDE_IDS)
    return ctx.store.exclude(req.ids, reason=req.reason, actor=who)
