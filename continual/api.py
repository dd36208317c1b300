"""The HTTP API v1 (FastAPI): routes, auth, error mapping, /metrics, health."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from continual.config import Settings
from continual.ingest import (
    BatchTooLarge,
    MalformedBody,
    SampleTooLarge,
    ValidationFailed,
    feedback_samples,
    parse_json,
)
from continual.metrics import CONTENT_TYPE_LATEST, Metrics
from continual.status import collect_status
from continual.store import IdConflict, NewSample, PayloadTooLarge, Store, StoreUnavailable

log = logging.getLogger("continual.api")


@dataclass
class AppContext:
    """Everything the routes use, built once by the service and passed in."""

    settings: Settings
    store: Store
    metrics: Metrics
    extras: dict[str, Any] = field(default_factory=dict)
    registry: Any = None  # continual.registry.Registry
    serving: Any = None  # continual.serving.Serving (None in a trainer-only process)


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "details"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers or {}


def error_response(err: ApiError) -> JSONResponse:
    body = {"error": {"code": err.code, "message": err.message, "details": err.details}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


# -- auth -------------------------------------------------------------------------
AuthScope = Literal["ingest", "admin"]


@dataclass(frozen=True)
class Auth:
    """Bearer tokens of both scopes, loaded once when the app is built."""

    enabled: bool
    ingest: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        return cls(
            enabled=settings.auth.enabled,
            ingest=tuple(t.encode() for t in sorted(settings.tokens("ingest"))),
            admin=tuple(t.encode() for t in sorted(settings.tokens("admin"))),
        )

    def scopes(self, token: str) -> frozenset[str]:
        """The scopes a token holds (admin implies ingest); empty for an unknown token."""
        raw = token.encode()
        admin, ingest = _matches_any(raw, self.admin), _matches_any(raw, self.ingest)
        return frozenset({"admin", "ingest"}) if admin else frozenset({"ingest"}) if ingest else frozenset()

    def check(self, authorization: str | None, scope: AuthScope) -> None:
        """Raise 401 (no or unknown token) or 403 (token without ``scope``); pass when auth is disabled."""
        if not self.enabled:
            return
        challenge = {"WWW-Authenticate": 'Bearer realm="continual"'}
        kind, _, token = (authorization or "").partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise ApiError(
                401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)", headers=challenge
            )
        held = self.scopes(token.strip())
        if not held:
            raise ApiError(401, "unauthorized", "unknown token", headers=challenge)
        if scope not in held:
            raise ApiError(403, "forbidden", f"this token lacks the {scope!r} scope")


def _matches_any(token: bytes, candidates: tuple[bytes, ...]) -> bool:
    # Compare with every candidate, without stopping early, in constant time each.
    found = False
    for c in candidates:
        found |= hmac.compare_digest(token, c)
    return found


def require_scope(scope: AuthScope) -> Any:
    """A route dependency: ``dependencies=[require_scope("admin")]`` or ``_=require_scope("ingest")``."""

    def _check(request: Request) -> None:
        request.app.state.auth.check(request.headers.get("authorization"), scope)

    return Depends(_check)


# -- request limits ---------------------------------------------------------------
def require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = repr(media) if media else "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {shown}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 from Content-Length or, without one, while streaming past ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", f"Content-Length is not a number: {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds ingest.max_body_bytes = {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"body exceeds ingest.max_body_bytes = {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


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


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(title="continual", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.state.auth = Auth.from_settings(ctx.settings)
    app.add_middleware(RequestMetrics, metrics=ctx.metrics)
    _add_error_handlers(app)
    _add_feedback_route(app, ctx)
    _model_routes(app, ctx)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_request: Request, err: StoreUnavailable) -> JSONResponse:
        return error_response(ApiError(503, "store_unavailable", str(err), headers={"Retry-After": "5"}))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        store_ok = ctx.store.ping()
        ctx.metrics.store_up.set(1 if store_ok else 0)
        model_ok = bool(ctx.extras.get("model_loaded", lambda: True)())
        ready = store_ok and model_ok
        return JSONResponse({"ready": ready, "store": store_ok, "model": model_ok}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", dependencies=[require_scope("ingest")])
    def status() -> dict[str, Any]:
        from continual.lifecycle import metrics_state

        serving = ctx.serving.version() if ctx.serving is not None else None
        return collect_status(
            ctx.settings, ctx.store, {"state": metrics_state(ctx.metrics), "serving_version": serving}
        )

    _add_train_route(app, ctx)
    _add_samples_route(app, ctx)
    return app


MAX_EXCLUDE_IDS = 10_000


def _add_samples_route(app: FastAPI, ctx: AppContext) -> None:
    @app.post("/v1/samples/exclude", dependencies=[require_scope("admin")])
    async def exclude(request: Request) -> dict[str, Any]:
        """Take poisoned or mislabeled feedback out of play by id (kept for the audit trail)."""
        require_json(request)
        doc = _parse_body(await read_body(request, ctx.settings.ingest.max_body_bytes))
        ids = doc.get("ids") if isinstance(doc, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise ApiError(
                422,
                "validation_error",
                'body must be {"ids": [non-empty strings], "reason": "..."}',
                [{"field": "ids", "message": "a non-empty list of sample ids"}],
            )
        if len(ids) > MAX_EXCLUDE_IDS:
            raise ApiError(413, "too_large", f"{len(ids)} ids in one request; at most {MAX_EXCLUDE_IDS}")
        reason = str(doc.get("reason") or "")[:500]
        changed, unknown = await run_in_threadpool(ctx.store.exclude, ids)
        await run_in_threadpool(
            ctx.store.record_event,
            "samples_excluded",
            f"{changed} samples excluded by {_actor(request)}: {reason}",
            {"ids": ids[:100], "n": changed, "unknown": unknown[:100], "reason": reason, "actor": _actor(request)},
        )
        return {"excluded": changed, "unknown": unknown}


def _add_train_route(app: FastAPI, ctx: AppContext) -> None:
    @app.post("/v1/train", dependencies=[require_scope("admin")], status_code=202)
    def train(request: Request) -> dict[str, Any]:
        """Ask for a run now: a pending run the trainer picks up at its next check (still gated)."""
        from continual.learn.runs import active_runs, request_run

        active = active_runs(ctx.store)
        if active:
            raise ApiError(
                409,
                "run_active",
                f"training run {active[0]['id']} is already {active[0]['status']}",
                [{"run_id": active[0]["id"], "status": active[0]["status"]}],
            )
        run_id = request_run(ctx.store, ctx.settings, actor=_actor(request))
        return {"run_id": run_id, "status": "pending"}


# -- error mapping ----------------------------------------------------------------
_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
            for e in err.errors()
        ]
        return error_response(ApiError(422, "validation_failed", "request is not valid", details))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(err.status_code, "error")
        return error_response(ApiError(err.status_code, code, str(err.detail), headers=dict(err.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
        # A bug, never an input: logged with its traceback, answered in the error format.
        log.exception("unhandled error: %s", err)
        return error_response(ApiError(500, "internal", "internal error; see the service log"))


# -- POST /v1/feedback ------------------------------------------------------------
def _add_feedback_route(app: FastAPI, ctx: AppContext) -> None:
    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, int]:
        n = 1  # rejected requests count once until their samples are known
        try:
            app.state.auth.check(request.headers.get("authorization"), "ingest")
            require_json(request)
            body = await read_body(request, ctx.settings.ingest.max_body_bytes)
            doc = await run_in_threadpool(_parse_body, body)
            samples = doc.get("samples") if isinstance(doc, dict) else None
            n = len(samples) if isinstance(samples, list) and samples else 1
            result = await run_in_threadpool(_store_feedback, doc, ctx)
        except ApiError as err:
            ctx.metrics.reject(_REJECT_REASON.get(err.status, "other"), n)
            raise
        except StoreUnavailable:
            ctx.metrics.reject("unavailable", n)
            raise
        ctx.metrics.feedback_samples.inc(result["accepted"])
        ctx.metrics.feedback_duplicates.inc(result["duplicates"])
        return result


_REJECT_REASON = {
    400: "malformed",
    401: "auth",
    403: "auth",
    409: "conflict",
    413: "too_large",
    415: "content_type",
    422: "validation",
}


def _parse_body(body: bytes) -> Any:
    try:
        return parse_json(body)
    except MalformedBody as e:
        raise ApiError(400, "malformed_json", str(e)) from None


def _store_feedback(doc: Any, ctx: AppContext) -> dict[str, int]:
    """Validate and store one batch (in a worker thread: image decoding and the commit block)."""
    try:
        batch = feedback_samples(doc, ctx.settings)
    except ValidationFailed as e:
        raise ApiError(422, "validation_failed", f"batch rejected, nothing stored: {e}", e.details) from None
    except BatchTooLarge as e:
        raise ApiError(413, "too_many_samples", str(e)) from None
    except SampleTooLarge as e:
        raise ApiError(413, "payload_too_large", f"batch rejected, nothing stored: {e}", e.details) from None
    try:
        result = ctx.store.insert(batch)
    except IdConflict as e:
        raise ApiError(
            409, "id_conflict", f"batch rejected, nothing stored: {e}", _conflict_details(batch, e.ids)
        ) from None
    except PayloadTooLarge as e:
        raise ApiError(413, "payload_too_large", str(e)) from None
    return {"accepted": result.accepted, "duplicates": result.duplicates}


def _conflict_details(batch: list[NewSample], ids: list[str]) -> list[dict[str, Any]]:
    conflicting = set(ids)
    return [
        {"index": i, "field": "id", "id": s.external_id, "message": "id already stored with a different label or input"}
        for i, s in enumerate(batch)
        if s.external_id in conflicting
    ]


# -- models: POST /v1/predict, GET /v1/models, promote, rollback (owner: models) ---
def _model_routes(app: FastAPI, ctx: AppContext) -> None:
    from continual.ingest import decode_inputs
    from continual.registry import ChecksumMismatch, NoPreviousChampion, VersionNotFound

    def predict_sync(doc: Any) -> dict[str, Any]:
        start = time.perf_counter()
        live = ctx.serving.live if ctx.serving is not None else None
        if live is None:
            raise ApiError(503, "no_model", "no champion model is loaded yet", headers={"Retry-After": "5"})
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        if not isinstance(inputs, list) or not inputs:
            raise ApiError(
                422,
                "validation_failed",
                'request rejected: expected {"inputs": [input, ...]} with at least one input',
                [{"field": "inputs", "message": "expected a non-empty list"}],
            )
        limit = ctx.settings.serving.max_batch
        if len(inputs) > limit:
            raise ApiError(413, "too_many_inputs", f"{len(inputs)} inputs exceed serving.max_batch = {limit}")
        try:
            decoded = decode_inputs(inputs, live.input, max_image_pixels=ctx.settings.ingest.max_image_pixels)
        except ValidationFailed as e:
            raise ApiError(422, "validation_failed", f"request rejected: {e}", e.details) from None
        version, preds = ctx.serving.predict(decoded, live=live)
        ctx.metrics.predictions.inc(len(preds))
        ctx.metrics.predict_latency.observe(time.perf_counter() - start)
        return {
            "model_version": version,
            "predictions": [{"label": p.label, "confidence": p.confidence, "scores": p.scores} for p in preds],
        }

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        app.state.auth.check(request.headers.get("authorization"), "ingest")
        require_json(request)
        body = await read_body(request, ctx.settings.ingest.max_body_bytes)
        # One hop to a worker thread for parsing, decoding and the forward pass.
        return await run_in_threadpool(lambda: predict_sync(_parse_body(body)))

    def registry() -> Any:
        if ctx.registry is None:
            raise ApiError(503, "no_registry", "this process has no model registry")
        return ctx.registry

    @app.get("/v1/models", dependencies=[require_scope("ingest")])
    def models() -> dict[str, Any]:
        reg = registry()
        champion = reg.champion()
        return {
            "champion": champion,
            "serving": ctx.serving.version() if ctx.serving is not None else None,
            "versions": [{**v, "champion": v["version"] == champion} for v in reversed(reg.versions())],
            "history": reg.history()[:50],
        }

    def sync_now() -> None:
        # This process swaps at once; other processes follow within serving.poll_interval_seconds.
        if ctx.serving is not None:
            ctx.serving.sync(ctx.registry)

    @app.post("/v1/models/rollback", dependencies=[require_scope("admin")])
    def rollback(request: Request) -> dict[str, Any]:
        reg = registry()
        before = reg.champion()
        try:
            target = reg.rollback(actor=_actor(request))
        except NoPreviousChampion as e:
            raise ApiError(409, "no_previous_champion", str(e)) from None
        except ChecksumMismatch as e:
            raise ApiError(409, "checksum_mismatch", str(e)) from None
        sync_now()
        return {"champion": target, "previous": before, "serving": _serving_version(ctx)}

    @app.post("/v1/models/{version}/promote", dependencies=[require_scope("admin")])
    def promote(version: str, request: Request) -> dict[str, Any]:
        reg = registry()
        before = reg.champion()
        try:
            reg.promote(version, reason="manual", actor=_actor(request))
        except VersionNotFound as e:
            raise ApiError(404, "version_not_found", str(e)) from None
        except ChecksumMismatch as e:
            raise ApiError(409, "checksum_mismatch", str(e)) from None
        sync_now()
        # "serving" differs from "champion" when this process could not load the version (see its log).
        return {"champion": version, "previous": before, "serving": _serving_version(ctx)}


def _serving_version(ctx: AppContext) -> str | None:
    return ctx.serving.version() if ctx.serving is not None else None


def _actor(request: Request) -> str:
    """Who acted, for the audit trail: a token fingerprint, never the token itself."""
    import hashlib

    kind, _, token = (request.headers.get("authorization") or "").partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return "anonymous"
    return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:12]
