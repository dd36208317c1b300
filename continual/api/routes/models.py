"""``GET /v1/models``, ``POST /v1/models/{version}/promote``, ``POST /v1/models/rollback``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from continual.api.auth import actor, require
from continual.api.context import AppContext
from continual.api.errors import NoRegistry
from continual.api.routes import Ctx
from continual.registry import ChecksumMismatch, Registry, VersionNotFound

router = APIRouter()
HISTORY_SHOWN = 50
MAX_HISTORY_PAGE = 1_000


def _registry(ctx: AppContext) -> Registry:
    if ctx.registry is None:
        raise NoRegistry("this process has no model registry")
    return ctx.registry


def _serving_version(ctx: AppContext) -> str | None:
    return ctx.serving.version() if ctx.serving is not None else None


def _sync_now(ctx: AppContext, registry: Registry) -> None:
    # This process swaps at once; other processes follow within serving.poll_interval_seconds.
    if ctx.serving is not None:
        ctx.serving.sync(registry)


@router.get("/v1/models", dependencies=[require("ingest")])
def models(
    ctx: Ctx,
    history_limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = HISTORY_SHOWN,
    history_offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Versions (newest first) and one page of the champion history (newest first; ``history_total`` in all)."""
    versions = ctx.store.versions
    champion = versions.champion_version()
    return {
        "champion": champion,
        "serving": _serving_version(ctx),
        "versions": [
            {**v, "classes": _classes(ctx, v), "champion": v["version"] == champion} for v in reversed(versions.rows())
        ],
        "history": versions.history(limit=history_limit, offset=history_offset),
        "history_total": versions.history_size(),
    }


def _classes(ctx: AppContext, row: dict[str, Any]) -> list[str] | None:
    """A version's classes: its row's, or (rows written before the store kept them) its manifest's."""
    if row.get("classes") is not None or ctx.registry is None or row["status"] == "deleted":
        return row.get("classes")
    try:
        return list(ctx.registry.manifest(row["version"]).classes)
    except (VersionNotFound, ChecksumMismatch):
        return None


@router.post("/v1/models/rollback", dependencies=[require("admin")])
def rollback(request: Request, ctx: Ctx) -> dict[str, Any]:
    registry = _registry(ctx)
    before, target = registry.rollback(actor=actor(request))
    ctx.metrics.rollbacks.inc()
    _sync_now(ctx, registry)
    return {"champion": target, "previous": before, "serving": _serving_version(ctx)}


@router.post("/v1/models/{version}/promote", dependencies=[require("admin")])
def promote(version: str, request: Request, ctx: Ctx) -> dict[str, Any]:
    registry = _registry(ctx)
    before = ctx.store.versions.champion_version()
    if registry.promote(version, expected=before, reason="manual", actor=actor(request)):
        ctx.metrics.promotions.inc()
    _sync_now(ctx, registry)
    # "serving" differs from "champion" when this process could not load the version (see its log).
    return {"champion": version, "previous": before, "serving": _serving_version(ctx)}
