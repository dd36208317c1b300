"""``POST /v1/feedback``: a batch of labeled samples, validated and stored all or nothing.

A sample may name a logged prediction instead of carrying its input
(``{"prediction_id", "label"}``, see :mod:`continual.ingest.reference`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from continual.api.auth import require
from continual.api.body import json_body
from continual.api.context import AppContext
from continual.api.routes import Ctx
from continual.ingest import UnknownPrediction, class_limit, feedback_samples
from continual.store import InsertResult, NewSample

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
    now = datetime.now(UTC)
    for _, predicted_at in result.labeled:
        ctx.metrics.label_delay.observe(max(0.0, (now - predicted_at).total_seconds()))
    return {"accepted": result.accepted, "duplicates": result.duplicates}


def _store(doc: Any, ctx: AppContext) -> InsertResult:  # Any: the parsed JSON, validated by feedback_samples
    """Validate and store one batch (in a worker thread: image decoding and the commit block)."""
    return ctx.store.insert(_samples(doc, ctx), class_limit=class_limit(ctx.settings.model))


def _samples(doc: Any, ctx: AppContext) -> list[NewSample]:  # Any: the parsed JSON
    model = ctx.settings.model
    # With new classes accepted, a label stored before is known; the store re-checks max_classes atomically.
    known = ctx.store.classes.names() if model.new_classes == "accept" else ()
    try:
        return feedback_samples(doc, ctx.settings, predictions=ctx.store.predictions, known=known)
    except UnknownPrediction:
        # A label sent right after its answer can beat this process's log writer to the
        # store: write what it holds and look once more.
        log = ctx.serving.log if ctx.serving is not None else None
        if log is None or not log.pending or not log.flush(timeout=5.0):
            raise
        return feedback_samples(doc, ctx.settings, predictions=ctx.store.predictions, known=known)
