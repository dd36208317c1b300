"""A small Python client for the HTTP API v1.

Retrying a feedback batch is safe: every sample has an id (given, or derived
from its content by the server), so a batch that was stored before a timeout
comes back as duplicates, never twice. One ``Client`` may be shared by threads.

    >>> from continual.client import Client, label_sample, vector_sample
    >>> with Client("http://127.0.0.1:8000", token="...") as c:           # doctest: +SKIP
    ...     c.feedback([vector_sample([0.0] * 64, "cat", id="row-1")])
    ...     pid = c.predict([{"x": [0.0] * 64}])["predictions"][0]["prediction_id"]
    ...     c.feedback([label_sample(pid, "dog")])                        # later, when the answer is known
    FeedbackResult(accepted=1, duplicates=0)
    FeedbackResult(accepted=1, duplicates=0)
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

RETRY_STATUSES = frozenset({502, 503, 504})


class ClientError(Exception):
    """The service refused a request; ``code`` and ``details`` come from its error body."""

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.details = details or []


class ServiceUnavailable(ClientError):
    """Still failing (503 or a connection error) after every retry."""


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int = 0
    duplicates: int = 0

    def __add__(self, other: FeedbackResult) -> FeedbackResult:
        return FeedbackResult(self.accepted + other.accepted, self.duplicates + other.duplicates)


def vector_sample(
    x: Any,  # Any: a flat list of numbers, nested lists, or a numpy array
    label: str,
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A feedback sample with a vector input (a list, nested lists or a numpy array)."""
    return _sample({"x": x.tolist() if hasattr(x, "tolist") else x}, label, id, metadata)


def image_sample(
    image: bytes | str | Path, label: str, *, id: str | None = None, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A feedback sample with an image input: encoded PNG/JPEG bytes or a path to such a file."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return _sample({"image": base64.b64encode(data).decode("ascii")}, label, id, metadata)


def text_sample(
    text: str, label: str, *, id: str | None = None, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A feedback sample with a text input (for ``[model.input] kind = "text"``)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _sample({"text": text}, label, id, metadata)


def label_sample(
    prediction_id: str, label: str, *, id: str | None = None, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A feedback sample by reference: the label for an earlier prediction, whose logged input the service uses.

    Without ``id`` the sample's id is ``"prediction:" + prediction_id``, so resending the
    label is a duplicate and another label for the same prediction a ``409``.
    """
    return _sample({"prediction_id": prediction_id}, label, id, metadata)


def _sample(inp: dict[str, Any], label: str, id: str | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"label": label, **inp}
    if id is not None:
        out["id"] = id
    if metadata is not None:
        out["metadata"] = metadata
    return out


class Client:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        batch_size: int = 500,
        http: httpx.Client | None = None,
    ) -> None:
        """``http``: an httpx.Client to send through instead (e.g. FastAPI's TestClient); its base URL is used."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.max_backoff, self.batch_size = retries, backoff, max_backoff, batch_size
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if http is not None:
            http.headers.update(headers)
            self._http = http
        else:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- API ----------------------------------------------------------------------
    def feedback(
        self,
        samples: Iterable[dict[str, Any]],
        *,
        batch_size: int | None = None,
        on_batch: Callable[[Sequence[dict[str, Any]], FeedbackResult], None] | None = None,
    ) -> FeedbackResult:
        """Send samples in batches (each all-or-nothing); returns the summed counts.

        A refused batch raises :class:`ClientError` (batches sent before it stay stored).
        """
        size = batch_size or self.batch_size
        total = FeedbackResult()
        batch: list[dict[str, Any]] = []
        for s in samples:
            batch.append(s)
            if len(batch) >= size:
                total += self._send(batch, on_batch)
                batch = []
        if batch:
            total += self._send(batch, on_batch)
        return total

    def send_batch(self, samples: Sequence[dict[str, Any]]) -> FeedbackResult:
        """One ``POST /v1/feedback`` (with retries)."""
        body = self._request("POST", "/v1/feedback", {"samples": list(samples)})
        return FeedbackResult(int(body["accepted"]), int(body["duplicates"]))

    def predict(self, inputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``POST /v1/predict``: ``{"model_version", "predictions": [{"label", "confidence", "scores", "prediction_id"}]}``.

        Keep a ``prediction_id`` to send its label later with :func:`label_sample`.
        """
        return self._request("POST", "/v1/predict", {"inputs": list(inputs)})

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status", None)

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: versions with their gate metrics and status."""
        return self._request("GET", "/v1/models", None)

    def train(self) -> dict[str, Any]:
        """``POST /v1/train`` (admin): ask for a run now; it is still gated. Returns ``{"run_id", "status"}``."""
        return self._request("POST", "/v1/train", {})

    def exclude(self, ids: Sequence[str], reason: str = "") -> dict[str, Any]:
        """``POST /v1/samples/exclude`` (admin): take poisoned or mislabeled samples out of play."""
        return self._request("POST", "/v1/samples/exclude", {"ids": list(ids), "reason": reason})

    def rollback(self) -> dict[str, Any]:
        """``POST /v1/models/rollback`` (admin): the previous champion serves again."""
        return self._request("POST", "/v1/models/rollback", {})

    # -- plumbing -----------------------------------------------------------------
    def _send(
        self,
        batch: list[dict[str, Any]],
        on_batch: Callable[[Sequence[dict[str, Any]], FeedbackResult], None] | None,
    ) -> FeedbackResult:
        result = self.send_batch(batch)
        if on_batch is not None:
            on_batch(batch, result)
        return result

    def _request(self, method: str, path: str, payload: Any) -> Any:  # Any: JSON in, JSON out
        content = None if payload is None else json.dumps(payload, default=_jsonable).encode("utf-8")
        headers = {"Content-Type": "application/json"} if content is not None else {}
        last: ClientError | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as e:
                # Connection refused/reset or a timeout: the request may or may not have
                # been stored; resending is safe because ids make it idempotent.
                last = ServiceUnavailable(0, "connection_error", f"{type(e).__name__}: {e}")
                delay = None
            else:
                if resp.status_code < 400:
                    return resp.json()
                err = _error_of(resp)
                if resp.status_code not in RETRY_STATUSES:
                    raise err
                last = ServiceUnavailable(err.status, err.code, err.message, err.details)
                delay = _retry_after(resp)
            if attempt < self.retries:
                time.sleep(self._delay(attempt, delay))
        raise last if last is not None else ServiceUnavailable(0, "no_attempt", "no request was made")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        # Exponential backoff with full jitter, so many clients do not retry in step.
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


def _error_of(resp: httpx.Response) -> ClientError:
    try:
        err = resp.json()["error"]
        return ClientError(resp.status_code, str(err["code"]), str(err["message"]), list(err.get("details") or []))
    except (ValueError, KeyError, TypeError):
        return ClientError(resp.status_code, "http_error", resp.text[:500] or resp.reason_phrase)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _jsonable(v: Any) -> Any:  # Any: json.dumps' default hook
    if hasattr(v, "tolist"):  # numpy arrays and scalars
        return v.tolist()
    raise TypeError(f"cannot send a {type(v).__name__} as JSON")
