"""An exclusion request ``{"ids": [...], "reason": "..."}``: sample ids by the feedback id rules, and why.

Pure, like :mod:`continual.ingest.batch`: ``POST /v1/samples/exclude`` and
``continual samples exclude`` both validate through :func:`exclusion_request`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from continual.ingest.batch import id_problem
from continual.ingest.decode import _json_type

MAX_REASON_LENGTH = 1_000
# NUL cannot be stored in PostgreSQL text, and lone surrogates are not UTF-8.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class ExclusionInvalid(ValueError):
    """Bad ids or reason; ``details`` holds ``{"index", "field", "message"}`` for each (422)."""

    def __init__(self, details: list[dict[str, Any]]) -> None:
        self.details = details
        first = details[0]
        where = f"index {first['index']}, " if first["index"] is not None else ""
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        super().__init__(f"{where}field {first['field']!r}: {first['message']}{more}")


class TooManyIds(ValueError):
    """More ids in one exclusion request than the route takes (413 ``too_large``)."""

    def __init__(self, n: int, limit: int) -> None:
        self.n, self.limit = n, limit
        super().__init__(f"{n} ids in one request; at most {limit}")


@dataclass(frozen=True)
class Exclusion:
    ids: list[str]
    reason: str


def exclusion_request(doc: Any, *, max_ids: int | None) -> Exclusion:  # Any: parsed JSON under validation
    """``doc`` validated: every id as feedback ids are (named by index), ``reason`` a storable string."""
    ids = doc.get("ids") if isinstance(doc, dict) else None
    if not isinstance(ids, list) or not ids:
        raise ExclusionInvalid(
            [
                {
                    "index": None,
                    "field": "ids",
                    "message": 'a non-empty list of sample ids: {"ids": [...], "reason": "..."}',
                }
            ]
        )
    if max_ids is not None and len(ids) > max_ids:
        raise TooManyIds(len(ids), max_ids)
    details = [{"index": i, "field": "ids", "message": p} for i, v in enumerate(ids) if (p := id_problem(v))]
    reason = doc.get("reason")
    problem = _reason_problem(reason)
    if problem:
        details.append({"index": None, "field": "reason", "message": problem})
    if details:
        raise ExclusionInvalid(details)
    return Exclusion(ids=ids, reason=reason or "")


def _reason_problem(reason: Any) -> str:  # Any: JSON value under validation
    if reason is None:
        return ""
    if not isinstance(reason, str):
        return f"expected a string, got {_json_type(reason)}"  # never repr(): it may nest 1,000 deep
    if len(reason) > MAX_REASON_LENGTH:
        return f"{len(reason)} characters; at most {MAX_REASON_LENGTH}"
    if _UNSTORABLE.search(reason):
        return "must not contain NUL characters or unpaired surrogates"
    return ""
