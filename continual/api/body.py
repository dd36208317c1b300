"""Reading a JSON request body: content type, size limit (before and while streaming), parsing off the event loop."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from continual.ingest import parse_json


class UnsupportedMediaType(ValueError):
    """The body is not declared as JSON (415)."""


class BadRequest(ValueError):
    """A malformed request line or header (400)."""


class BodyTooLarge(ValueError):
    """The body exceeds ``ingest.max_body_bytes`` (413)."""


def require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = repr(media) if media else "none"
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {shown}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused from Content-Length or, without one, while streaming past ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(f"Content-Length is not a number: {declared!r}")
        if int(declared) > limit:
            raise BodyTooLarge(f"body of {declared} bytes exceeds ingest.max_body_bytes = {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"body exceeds ingest.max_body_bytes = {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> Any:  # Any: whatever JSON the client sent
    """Content type checked, body read within ``limit``, then parsed in a worker thread (a big body takes a while)."""
    require_json(request)
    body = await read_body(request, limit)
    return await run_in_threadpool(parse_json, body)
