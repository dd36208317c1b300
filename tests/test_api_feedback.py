"""POST /v1/feedback through FastAPI's test client, over SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from ingestutil import b64, image_bytes, image_settings, make_client, vector_settings

JSON = {"Content-Type": "application/json"}


def vec(i: int, label: str = "cat", **extra: object) -> dict[str, object]:
    return {"id": f"s{i}", "label": label, "x": [i, i + 1, i + 2, 0.5], **extra}


def post(client, doc: object):  # type: ignore[no-untyped-def]
    return client.post("/v1/feedback", content=json.dumps(doc).encode(), headers=JSON)


def err(resp) -> dict:  # type: ignore[no-untyped-def]
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


def value(metrics, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_vectors_are_stored_and_counted(tmp_path: Path, store_url: str) -> None:
    client, store, metrics = make_client(vector_settings(tmp_path), store_url)
    r = post(client, {"samples": [vec(i, "cat" if i % 2 else "dog") for i in range(5)]})
    assert r.status_code == 200 and r.json() == {"accepted": 5, "duplicates": 0}
    assert store.count() == 5 and store.label_counts() == {"cat": 2, "dog": 3}
    assert value(metrics, "continual_feedback_samples_total") == 5
    route = {"route": "/v1/feedback", "method": "POST", "status": "200"}
    assert value(metrics, "continual_http_request_duration_seconds_count", **route) == 1


def test_images_are_stored_as_received(tmp_path: Path, store_url: str) -> None:
    client, store, _ = make_client(image_settings(tmp_path), store_url)
    png, jpeg = image_bytes(mode="L"), image_bytes(fmt="JPEG", seed=1)
    r = post(
        client, {"samples": [{"label": "cat", "image": b64(png)}, {"id": "j", "label": "dog", "image": b64(jpeg)}]}
    )
    assert r.json() == {"accepted": 2, "duplicates": 0}
    rows = {row.label: row for batch in store.iter_samples() for row in batch}
    assert rows["cat"].payload == png and rows["cat"].kind == "image" and rows["cat"].external_id.startswith("sha256:")
    assert rows["dog"].payload == jpeg and rows["dog"].external_id == "j"


def test_retry_of_the_same_batch_stores_nothing_twice(tmp_path: Path, store_url: str) -> None:
    client, store, metrics = make_client(vector_settings(tmp_path), store_url)
    batch = {"samples": [vec(1), vec(2), {"label": "dog", "x": [9, 9, 9, 9]}]}
    assert post(client, batch).json() == {"accepted": 3, "duplicates": 0}
    assert post(client, batch).json() == {"accepted": 0, "duplicates": 3}
    # Repeats inside one batch are duplicates too.
    assert post(client, {"samples": [vec(3), vec(3)]}).json() == {"accepted": 1, "duplicates": 1}
    assert store.count() == 4
    assert value(metrics, "continual_feedback_duplicates_total") == 4


@pytest.mark.parametrize("change", [{"label": "dog"}, {"x": [0, 0, 0, 0]}])
def test_same_id_with_other_content_is_409_and_stores_nothing(
    tmp_path: Path, store_url: str, change: dict[str, object]
) -> None:
    client, store, metrics = make_client(vector_settings(tmp_path), store_url)
    assert post(client, {"samples": [vec(1)]}).status_code == 200
    r = post(client, {"samples": [vec(2), {**vec(1), **change}]})
    assert r.status_code == 409
    e = err(r)
    assert e["code"] == "id_conflict" and e["details"] == [
        {"index": 1, "field": "id", "id": "s1", "message": "id already stored with a different label or input"}
    ]
    assert store.count() == 1
    assert value(metrics, "continual_feedback_rejected_total", reason="conflict") == 2


def test_conflict_inside_one_batch_is_409(tmp_path: Path, store_url: str) -> None:
    client, store, _ = make_client(vector_settings(tmp_path), store_url)
    r = post(client, {"samples": [vec(1), vec(1, "dog")]})
    assert r.status_code == 409 and store.count() == 0


def test_one_bad_sample_rejects_the_batch_and_names_every_bad_one(tmp_path: Path, store_url: str) -> None:
    client, store, metrics = make_client(vector_settings(tmp_path), store_url)
    body = b'{"samples": [%s, {"label": "cat", "x": [1, 2, 3]}, %s, {"label": "cow", "x": [1, 2, NaN, 4]}]}' % (
        json.dumps(vec(1)).encode(),
        json.dumps(vec(2)).encode(),
    )
    r = client.post("/v1/feedback", content=body, headers=JSON)
    assert r.status_code == 422
    e = err(r)
    assert e["code"] == "validation_failed"
    assert [(d["index"], d["field"]) for d in e["details"]] == [(1, "x"), (3, "label"), (3, "x[2]")]
    assert e["details"][0]["message"] == "expected 4 numbers, got 3"
    assert store.count() == 0
    assert value(metrics, "continual_feedback_rejected_total", reason="validation") == 4


@pytest.mark.parametrize("body", [b"{", b"", b"\xff\xfe", b"[" * 50_000, b'{"samples": [1e999999]}' * 2])
def test_malformed_json_is_400(tmp_path: Path, store_url: str, body: bytes) -> None:
    client, store, _ = make_client(vector_settings(tmp_path), store_url)
    r = client.post("/v1/feedback", content=body, headers=JSON)
    assert r.status_code == 400 and err(r)["code"] == "malformed_json"
    assert store.count() == 0


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_content_type_must_be_json(tmp_path: Path, store_url: str, ctype: str | None) -> None:
    client, store, _ = make_client(vector_settings(tmp_path), store_url)
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post("/v1/feedback", content=json.dumps({"samples": [vec(1)]}).encode(), headers=headers)
    assert r.status_code == 415 and err(r)["code"] == "unsupported_media_type"
    assert store.count() == 0
    ok = client.post(
        "/v1/feedback",
        content=json.dumps({"samples": [vec(1)]}).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_body_limit_from_content_length_and_while_streaming(tmp_path: Path, store_url: str) -> None:
    client, store, _ = make_client(vector_settings(tmp_path, ingest={"max_body_bytes": 2048}), store_url)
    doc = {"samples": [vec(i) for i in range(60)]}
    data = json.dumps(doc).encode()
    assert len(data) > 2048
    r = client.post("/v1/feedback", content=data, headers=JSON)
    assert r.status_code == 413 and err(r)["code"] == "body_too_large"

    def chunks():  # type: ignore[no-untyped-def]
        # No Content-Length: the server has to count while reading.
        for i in range(0, len(data), 500):
            yield data[i : i + 500]

    r = client.post("/v1/feedback", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and err(r)["code"] == "body_too_large"
    small = json.dumps({"samples": [vec(1)]}).encode()
    assert client.post("/v1/feedback", content=iter([small]), headers=JSON).status_code == 200
    assert store.count() == 1


def test_too_many_samples_and_too_large_payloads_are_413(tmp_path: Path, store_url: str) -> None:
    client, store, _ = make_client(vector_settings(tmp_path, ingest={"max_batch_samples": 3}), store_url)
    r = post(client, {"samples": [vec(i) for i in range(4)]})
    assert r.status_code == 413 and err(r)["code"] == "too_many_samples"
    assert store.count() == 0


def test_payload_over_the_store_limit_is_413(tmp_path: Path, store_url: str) -> None:
    client, store, _ = make_client(image_settings(tmp_path, store={"max_payload_bytes": 200}), store_url)
    big = image_bytes(w=64, h=64)
    r = post(
        client,
        {"samples": [{"label": "cat", "image": b64(image_bytes(w=2, h=2))}, {"label": "cat", "image": b64(big)}]},
    )
    assert r.status_code == 413
    e = err(r)
    assert e["code"] == "payload_too_large" and [d["index"] for d in e["details"]] == [1]
    assert store.count() == 0


def test_store_locked_answers_503_with_retry_after_and_stores_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    client, store, metrics = make_client(vector_settings(tmp_path), url)
    blocker = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the lock past busy_timeout
    try:
        r = post(client, {"samples": [vec(1), vec(2)]})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert r.status_code == 503
    assert err(r)["code"] == "store_unavailable" and int(r.headers["Retry-After"]) > 0
    assert store.count() == 0
    assert value(metrics, "continual_feedback_rejected_total", reason="unavailable") == 2
    assert post(client, {"samples": [vec(1), vec(2)]}).json() == {"accepted": 2, "duplicates": 0}


def test_unreachable_database_answers_503(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from continual.api import AppContext, create_app
    from continual.metrics import Metrics
    from continual.store import Store

    with socket_port() as port:  # nothing listens there
        store = Store(f"postgresql+psycopg://nobody@127.0.0.1:{port}/none?connect_timeout=2")
        client = TestClient(create_app(AppContext(vector_settings(tmp_path), store, Metrics())))
        r = post(client, {"samples": [vec(1)]})
    assert r.status_code == 503 and err(r)["code"] == "store_unavailable" and "Retry-After" in r.headers


def socket_port():  # type: ignore[no-untyped-def]
    import contextlib
    import socket

    @contextlib.contextmanager
    def _port():  # type: ignore[no-untyped-def]
        s = socket.socket()
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        try:
            yield s.getsockname()[1]
        finally:
            s.close()

    return _port()


def test_unknown_routes_and_methods_use_the_error_format_and_bounded_labels(tmp_path: Path, store_url: str) -> None:
    client, _, metrics = make_client(vector_settings(tmp_path), store_url)
    r = client.get("/v1/no-such-thing/12345")
    assert r.status_code == 404 and err(r)["code"] == "not_found"
    r = client.get("/v1/feedback")
    assert r.status_code == 405 and err(r)["code"] == "method_not_allowed"
    assert (
        value(metrics, "continual_http_request_duration_seconds_count", route="unmatched", method="GET", status="404")
        == 1
    )
    assert (
        value(
            metrics, "continual_http_request_duration_seconds_count", route="/v1/feedback", method="GET", status="405"
        )
        == 1
    )


def test_metrics_endpoint_is_prometheus_text(tmp_path: Path, store_url: str) -> None:
    client, _, _ = make_client(vector_settings(tmp_path), store_url)
    post(client, {"samples": [vec(1)]})
    r = client.get("/metrics", follow_redirects=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "continual_feedback_samples_total 1.0" in r.text


def test_ids_and_metadata_every_database_can_store(tmp_path: Path, store_url: str) -> None:
    client, store, _ = make_client(vector_settings(tmp_path, ingest={"max_metadata_bytes": 100}), store_url)
    body = (
        b'{"samples": ['
        b'{"id": "a\\u0000b", "label": "cat", "x": [1, 2, 3, 4]},'
        b'{"id": "\\ud800", "label": "cat", "x": [1, 2, 3, 4]},'
        b'{"id": "ok-1", "label": "cat", "x": [1, 2, 3, 4], "metadata": {"a": NaN}},'
        b'{"id": "ok-2", "label": "cat", "x": [1, 2, 3, 4], "metadata": {"\\udc00": 1}},'
        b'{"id": "ok-3", "label": "cat", "x": [1, 2, 3, 4], "metadata": {"long": "' + b"y" * 100 + b'"}}'
        b"]}"
    )
    r = client.post("/v1/feedback", content=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert [(d["index"], d["field"]) for d in err(r)["details"]] == [
        (0, "id"),
        (1, "id"),
        (2, "metadata"),
        (3, "metadata"),
        (4, "metadata"),
    ]
    # What is valid JSON text for both databases goes in, NUL escapes inside metadata included.
    ok = b'{"samples": [{"id": "ok-4", "label": "cat", "x": [1, 2, 3, 4], "metadata": {"n": "a\\u0000", "e": "\\u00e9"}}]}'
    assert client.post("/v1/feedback", content=ok, headers=JSON).json() == {"accepted": 1, "duplicates": 0}
    assert store.count() == 1


def test_new_labels_follow_the_label_policy(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client, store, metrics = make_client(vector_settings(tmp_path), store_url)
    r = post(client, {"samples": [vec(1, "fox")]})  # default: refuse
    assert r.status_code == 422 and err(r)["details"][0]["field"] == "label" and store.count() == 0
    store.dispose()

    client, store, metrics = make_client(vector_settings(tmp_path, model={"new_classes": "accept", "max_classes": 4}),
                                         store_url)  # fmt: skip
    r = post(client, {"samples": [vec(1, "fox"), vec(2, "cat"), vec(3, "fox")]})
    assert r.status_code == 200 and r.json() == {"accepted": 3, "duplicates": 0}
    assert store.classes.names() == ["fox", "cat"]
    r = post(client, {"samples": [vec(4, "cat"), vec(5, "emu")]})  # cat, dog, bird, fox: no room for emu
    e = err(r)
    assert r.status_code == 422 and e["details"] == [
        {
            "index": 1,
            "field": "label",
            "message": "new class 'emu' would exceed [model] max_classes = 4 (4 classes known)",
        }
    ]
    # A batch that passed validation on a stale view of the classes is refused by the store, in the same format.
    monkeypatch.setattr(store.classes, "names", lambda: [])
    r = post(client, {"samples": [vec(6, "cat"), vec(7, "emu")]})
    assert r.status_code == 422 and err(r)["details"][0]["index"] == 1 and "max_classes = 4" in err(r)["message"]
    assert store.count() == 3 and value(metrics, "continual_feedback_rejected_total", reason="validation") == 4
    store.dispose()
