"""The one place where exceptions become HTTP answers: ``{"error": {"code", "message", "details"}}``.

Domain code raises named exceptions where things go wrong (``IdConflict`` in the
store, ``ValidationFailed`` in ingest, ``NoModel`` in serving, ...); :data:`TABLE`
maps each to a status and a code. Anything not in the table is a bug: logged
with its traceback and answered 500 in the same format. Rejected feedback is
counted here too (``continual_feedback_rejected_total{reason}``), once per
sample when the request got far enough to know them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from continual.api.auth import Forbidden, Unauthorized
from continual.api.body import BadRequest, BodyTooLarge, UnsupportedMediaType
from continual.ingest import (
    BatchTooLarge,
    DecodedTooLarge,
    ExclusionInvalid,
    InputNotLogged,
    MalformedBody,
    TooManyIds,
    TooManyInputs,
    UnknownPrediction,
    ValidationFailed,
)
from continual.learn.labelqueue import BadQueueRequest
from continual.metrics import Metrics
from continual.registry import ChecksumMismatch
from continual.serving import NoModel
from continual.store import (
    ChampionMoved,
    IdConflict,
    NoPreviousChampion,
    PayloadTooLarge,
    RunActive,
    StoreUnavailable,
    TooManyClasses,
    VersionNotFound,
)

log = logging.getLogger("continual.api")

RETRY_AFTER = {"Retry-After": "5"}
STORE_DOWN = "the store is unavailable or did not answer in time; nothing was stored, retry later"
Details = list[dict[str, Any]]


class NoRegistry(RuntimeError):
    """This process was built without a model registry (503)."""


def _details(e: Exception) -> Details:
    return list(getattr(e, "details", []))


@dataclass(frozen=True)
class Rule:
    status: int
    code: str
    details: Callable[[Exception], Details] = lambda _e: []
    headers: dict[str, str] = field(default_factory=dict)
    # Errors that refuse a whole batch say so, so nobody wonders whether part of it was kept.
    rejects_batch: bool = False


# Checked in order: the first class an exception is an instance of decides.
TABLE: list[tuple[type[Exception], Rule]] = [
    (MalformedBody, Rule(400, "malformed_json")),
    (BadRequest, Rule(400, "bad_request")),
    (Unauthorized, Rule(401, "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="continual"'})),
    (Forbidden, Rule(403, "forbidden")),
    (VersionNotFound, Rule(404, "version_not_found")),
    (IdConflict, Rule(409, "id_conflict", _details, rejects_batch=True)),
    (ChampionMoved, Rule(409, "champion_moved")),
    (NoPreviousChampion, Rule(409, "no_previous_champion")),
    (ChecksumMismatch, Rule(409, "checksum_mismatch")),
    (RunActive, Rule(409, "run_active", lambda e: [{"run_id": e.run_id, "status": e.status}])),  # type: ignore[attr-defined]
    (BodyTooLarge, Rule(413, "body_too_large")),
    (BatchTooLarge, Rule(413, "too_many_samples")),
    (PayloadTooLarge, Rule(413, "payload_too_large", _details, rejects_batch=True)),
    (TooManyInputs, Rule(413, "too_many_inputs")),
    (TooManyIds, Rule(413, "too_large")),
    (DecodedTooLarge, Rule(413, "decoded_too_large", rejects_batch=True)),
    (UnsupportedMediaType, Rule(415, "unsupported_media_type")),
    (ValidationFailed, Rule(422, "validation_failed", _details, rejects_batch=True)),
    (UnknownPrediction, Rule(422, "unknown_prediction", _details, rejects_batch=True)),
    (InputNotLogged, Rule(422, "input_not_logged", _details, rejects_batch=True)),
    (ExclusionInvalid, Rule(422, "validation_error", _details)),
    (TooManyClasses, Rule(422, "validation_failed", _details, rejects_batch=True)),
    (BadQueueRequest, Rule(422, "validation_failed", _details)),
    (NoModel, Rule(503, "no_model", headers=RETRY_AFTER)),
    (NoRegistry, Rule(503, "no_registry")),
    (StoreUnavailable, Rule(503, "store_unavailable", headers=RETRY_AFTER)),
]

# Starlette's own errors (unknown route, wrong method, ...).
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
# Why feedback was rejected, by status (a bounded label set; see continual.metrics.REJECT_REASONS).
_REJECT_REASON = {
    400: "malformed",
    401: "auth",
    403: "auth",
    409: "conflict",
    413: "too_large",
    415: "content_type",
    422: "validation",
    503: "unavailable",
}
FEEDBACK_PATH = "/v1/feedback"


def rule_for(e: Exception) -> Rule | None:
    return next((rule for cls, rule in TABLE if isinstance(e, cls)), None)


def error_response(
    status: int, code: str, message: str, details: Details | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI, metrics: Metrics) -> None:
    """Register the handlers: the table's exceptions, FastAPI's request validation, Starlette's HTTP errors, bugs."""

    def answer(
        request: Request, status: int, code: str, message: str, details: Details, headers: dict[str, str]
    ) -> JSONResponse:
        if request.url.path == FEEDBACK_PATH and status >= 400:
            metrics.reject(_REJECT_REASON.get(status, "other"), getattr(request.state, "samples", 1))
        return error_response(status, code, message, details, headers)

    async def domain(request: Request, e: Exception) -> JSONResponse:
        rule = rule_for(e)
        if rule is None:  # a subclass registered by accident: treat as a bug
            return await unexpected(request, e)
        message = str(e)
        if rule.rejects_batch:
            message = (
                "batch rejected, nothing stored: " if request.url.path == FEEDBACK_PATH else "request rejected: "
            ) + message
        if isinstance(e, StoreUnavailable):
            log.warning("%s %s: %s", request.method, request.url.path, e)
        return answer(request, rule.status, rule.code, message, rule.details(e), dict(rule.headers))

    for cls, _rule in TABLE:
        app.add_exception_handler(cls, domain)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
            for e in err.errors()
        ]
        return answer(request, 422, "validation_failed", "request is not valid", details, {})

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(err.status_code, "error")
        return answer(request, err.status_code, code, str(err.detail), [], dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        # A bug, never an input: logged with its traceback, answered in the error format.
        log.exception("unhandled error: %s", err)
        return answer(request, 500, "internal", "internal error; see the service log", [], {})
