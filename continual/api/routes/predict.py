"""``POST /v1/predict``: decode the inputs, run the champion, answer labels, scores, prediction ids and the version."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from continual.api.auth import require
from continual.api.body import read_body, require_json
from continual.api.context import AppContext
from continual.api.routes import Ctx
from continual.ingest import parse_json, predict_inputs
from continual.serving import NoModel

router = APIRouter()


@router.post("/v1/predict", dependencies=[require("ingest")])
async def predict(request: Request, ctx: Ctx) -> dict[str, Any]:
    require_json(request)
    body = await read_body(request, ctx.settings.ingest.max_body_bytes)
    # One hop to a worker thread for parsing, decoding and the forward pass.
    return await run_in_threadpool(_predict, body, ctx)


def _predict(body: bytes, ctx: AppContext) -> dict[str, Any]:
    start = time.perf_counter()
    live = ctx.serving.live if ctx.serving is not None else None
    if live is None:
        raise NoModel("no champion model is loaded yet")
    decoded = predict_inputs(
        parse_json(body),
        live.input,
        max_inputs=ctx.settings.serving.max_batch,
        max_image_pixels=ctx.settings.ingest.max_image_pixels,
        max_request_pixels=ctx.settings.ingest.max_request_pixels,
    )
    version, preds = ctx.serving.predict(decoded, live=live)  # type: ignore[union-attr]
    ctx.metrics.predictions.inc(len(preds))
    stats = getattr(live.transform, "stats", None)
    if callable(stats):  # text: the tokenizer's running counts (truncations)
        s = stats()
        ctx.metrics.mirror_text_stats(live.transform, s.texts, s.truncated)
    ctx.metrics.predict_latency.observe(time.perf_counter() - start)
    return {
        "model_version": version,
        "predictions": [
            {"label": p.label, "confidence": p.confidence, "scores": p.scores, "prediction_id": p.prediction_id}
            for p in preds
        ],
    }
