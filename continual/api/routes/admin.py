"""``POST /v1/train`` (ask for a gated run now) and ``POST /v1/samples/exclude`` (take feedback out of play)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from continual.api.auth import actor, require
from continual.api.body import json_body
from continual.api.errors import InvalidRequest, TooManyIds
from continual.api.routes import Ctx
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
    doc = await json_body(request, ctx.settings.ingest.max_body_bytes)
    ids = doc.get("ids") if isinstance(doc, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise InvalidRequest(
            'body must be {"ids": [non-empty strings], "reason": "..."}',
            [{"field": "ids", "message": "a non-empty list of sample ids"}],
        )
    if len(ids) > MAX_EXCLUDE_IDS:
        raise TooManyIds(f"{len(ids)} ids in one request; at most {MAX_EXCLUDE_IDS}")
    reason = str(doc.get("reason") or "")[:500]
    who = actor(request)
    changed, unknown = await run_in_threadpool(ctx.store.exclude, ids)
    await run_in_threadpool(
        ctx.store.records.add_event,
        "samples_excluded",
        f"{changed} samples excluded by {who}: {reason}",
        {"ids": ids[:100], "n": changed, "unknown": unknown[:100], "reason": reason, "actor": who},
    )
    return {"excluded": changed, "unknown": unknown}
