"""``POST /v1/feedback``: a batch of labeled samples, validated and stored all or nothing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from continual.api.auth import require
from continual.api.body import json_body
from continual.api.context import AppContext
from continual.api.routes import Ctx
from continual.ingest import class_limit, feedback_samples
from continual.store import InsertResult

router = APIRouter()


@router.post("/v1/feedback", dependencies=[require("ingest")])
async def feedback(request: Request, ctx: Ctx) -> dict[str, int]:
    doc = await json_body(request, ctx.settings.ingest.max_body_bytes)
    samples = doc.get("samples") if isinstance(doc, dict) else None
    # Rejections count once per sample from here on (see continual.api.errors).
    request.state.samples = len(samples) if isinstance(samples, list) and samples else 1
    result = await run_in_threadpool(_store, doc, ctx)
    ctx.metrics.feedback_samples.inc(result.accepted)
    ctx.metrics.feedback_duplicates.inc(result.duplicates)
    return {"accepted": result.accepted, "duplicates": result.duplicates}


def _store(doc: Any, ctx: AppContext) -> InsertResult:  # Any: the parsed JSON, validated by feedback_samples
    """Validate and store one batch (in a worker thread: image decoding and the commit block)."""
    model = ctx.settings.model
    # With new classes accepted, a label stored before is known; the store re-checks max_classes atomically.
    known = ctx.store.classes.names() if model.new_classes == "accept" else ()
    return ctx.store.insert(feedback_samples(doc, ctx.settings, known=known), class_limit=class_limit(model))
