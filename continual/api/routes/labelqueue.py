"""``GET /v1/label-queue?k=N``: the logged, unlabeled predictions most worth a label, leased to the caller."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request

from continual.api.auth import actor, require
from continual.api.routes import Ctx
from continual.learn.labelqueue import items_json, next_items

router = APIRouter()


@router.get("/v1/label-queue", dependencies=[require("ingest")])
def label_queue(request: Request, ctx: Ctx, k: Annotated[int, Query()] = 10) -> dict[str, Any]:
    """Up to ``k`` items, each leased for ``[label_queue] lease_seconds``; label them by prediction id via feedback.

    k outside 1..``[label_queue] max_k`` is a 422. The champion this process serves
    embeds the candidates for the diversity step (a process that serves none ranks
    by uncertainty alone).
    """
    live = ctx.serving.live if ctx.serving is not None else None
    model = live.module if live is not None else None
    spec = live.input if live is not None else ctx.settings.model.input
    device = live.device if live is not None else torch.device("cpu")
    items = next_items(ctx.store, ctx.settings, model, spec, k=k, device=device, holder=actor(request))
    ctx.metrics.label_queue_items.inc(len(items))
    return {
        "k": k,
        "lease_seconds": ctx.settings.label_queue.lease_seconds,
        "items": items_json(items),
    }
