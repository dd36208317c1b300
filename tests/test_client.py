"""The Python client against a real `continual serve` child process on a loopback port."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from ingestutil import image_bytes
from serverutil import ServerProcess, free_port, running_server

from continual.client import Client, ClientError, FeedbackResult, ServiceUnavailable, image_sample, vector_sample

INGEST, ADMIN = "ingest-secret", "admin-secret"
CONFIG = {
    "auth": {"enabled": True, "ingest_tokens": [INGEST], "admin_tokens": [ADMIN]},
    "ingest": {"max_body_bytes": 65536, "max_batch_samples": 100},
    "store": {"busy_timeout_ms": 300},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(CONFIG, workdir=tmp_path_factory.mktemp("server"))
    srv.start()
    yield srv
    srv.stop()


def vectors(prefix: str, n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    return [vector_sample(rng.normal(size=64), str(i % 10), id=f"{prefix}-{i}") for i in range(n)]


def count(srv: ServerProcess) -> int:
    with Client(srv.url, INGEST) as c:
        return int(c.status()["samples"]["total"])


def raw(srv: ServerProcess, body: bytes, token: str | None = INGEST, ctype: str = "application/json") -> httpx.Response:
    headers = {"Content-Type": ctype} | ({"Authorization": f"Bearer {token}"} if token else {})
    return httpx.post(srv.url + "/v1/feedback", content=body, headers=headers, timeout=30)


@pytest.mark.slow
def test_batches_of_vectors_are_accepted_and_a_retry_stores_once(server: ServerProcess) -> None:
    before = count(server)
    samples = vectors("batch", 250)
    with Client(server.url, INGEST, batch_size=40) as c:
        assert c.feedback(samples) == FeedbackResult(250, 0)
        # The same batches again (a client that timed out and resent): nothing stored twice.
        assert c.feedback(samples) == FeedbackResult(0, 250)
        # Samples without ids dedupe by content.
        anon = [vector_sample(np.ones(64) * i, "3") for i in range(5)]
        assert c.feedback(anon + anon) == FeedbackResult(5, 5)
    assert count(server) == before + 255


@pytest.mark.slow
def test_batches_of_images_are_accepted(tmp_path: Path) -> None:
    config = {"model": {"classes": ["cat", "dog"], "input": {"kind": "image", "channels": 3}}}
    with running_server(config, workdir=tmp_path) as url, Client(url) as c:
        samples = [image_sample(image_bytes(seed=i, mode="L" if i % 2 else "RGB"), "cat") for i in range(4)]
        samples.append(image_sample(image_bytes(fmt="JPEG"), "dog", id="jpeg-1", metadata={"camera": "a"}))
        assert c.feedback(samples, batch_size=2) == FeedbackResult(5, 0)
        status = c.status()
    assert status["samples"]["by_label"]["cat"]["train"] + status["samples"]["by_label"]["cat"]["holdout"] == 4
    assert "auth is DISABLED" in (tmp_path / "server.log").read_text()


@pytest.mark.slow
def test_every_error_code_from_real_bad_requests(server: ServerProcess) -> None:
    before = count(server)
    ok = json.dumps({"samples": vectors("err", 2)}).encode()
    assert raw(server, b'{"samples": [').status_code == 400
    r = raw(server, ok, token=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert raw(server, ok, token="guess").status_code == 401
    assert raw(server, ok, ctype="text/plain").status_code == 415
    r = raw(server, json.dumps({"samples": [{"label": "3", "x": [1.0] * 63}]}).encode())
    assert r.status_code == 422
    assert r.json()["error"]["details"] == [{"index": 0, "field": "x", "message": "expected 64 numbers, got 63"}]
    big = json.dumps({"samples": vectors("big", 90)}).encode()
    assert len(big) > 65536
    r = raw(server, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = raw(server, json.dumps({"samples": [{"label": "3", "x": [0] * 64}] * 101}).encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_samples"
    assert raw(server, ok).status_code == 200
    conflict = json.loads(ok)
    conflict["samples"][1]["label"] = "9" if conflict["samples"][1]["label"] != "9" else "8"
    r = raw(server, json.dumps(conflict).encode())
    assert r.status_code == 409 and r.json()["error"]["details"][0]["index"] == 1
    assert count(server) == before + 2
    with Client(server.url, INGEST, retries=0) as c, pytest.raises(ClientError) as e:
        c.feedback([{"label": "nope", "x": [0] * 64}])
    assert e.value.status == 422 and e.value.details[0]["field"] == "label"


@pytest.mark.slow
def test_admin_routes_refuse_ingest_tokens_with_403(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/models/rollback", headers={"Authorization": f"Bearer {INGEST}"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


@pytest.mark.slow
def test_store_locked_gives_503_and_the_client_retries_until_it_is_free(server: ServerProcess) -> None:
    db = server.workdir / "data" / "continual.db"
    before = count(server)
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        r = raw(server, json.dumps({"samples": vectors("locked", 3)}).encode())
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert int(r.headers["Retry-After"]) > 0
        # Release the lock a little later; the client keeps retrying meanwhile.
        release = threading.Timer(1.0, lambda: blocker.execute("ROLLBACK"))
        release.start()
        with Client(server.url, INGEST, retries=20, max_backoff=0.3) as c:
            assert c.feedback(vectors("locked", 3)) == FeedbackResult(3, 0)
        release.join()
    finally:
        blocker.close()
    assert count(server) == before + 3


def test_connection_errors_are_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with Client(url, retries=2, backoff=0.01) as c, pytest.raises(ServiceUnavailable) as e:
        c.feedback(vectors("down", 1))
    assert e.value.code == "connection_error" and time.monotonic() - start < 30


@pytest.mark.slow
def test_ingest_cli_imports_npz_and_csv_and_resumes(server: ServerProcess, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    npz = tmp_path / "part.npz"
    x = rng.normal(size=(120, 64)).astype(np.float32)
    x[7, 3] = np.nan  # one bad row: reported, the rest goes in
    np.savez(npz, x=x, y=rng.integers(0, 10, size=120))
    csv = tmp_path / "rows.csv"
    header = ",".join(f"f{i}" for i in range(64)) + ",label"
    rows = [",".join(str(v) for v in rng.normal(size=64).round(3)) + f",{i % 10}" for i in range(30)]
    csv.write_text("\n".join([header, *rows, ",".join(["1"] * 64) + ",eleven"]) + "\n")
    before = count(server)

    def ingest(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "continual.cli", "ingest", str(path), "--url", server.url, "--batch-size", "25"],
            env={**server.env, "CONTINUAL_TOKEN": INGEST},
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = ingest(npz)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("accepted 119, duplicates 0, rejected 1")
    assert "part.npz row 7: x[3]: every number must be finite" in first.stdout
    assert "120/120" in first.stderr  # the progress bar reached the end
    again = ingest(npz)
    assert again.stdout.startswith("accepted 0, duplicates 119, rejected 1")
    from_csv = ingest(csv)
    assert from_csv.stdout.startswith("accepted 30, duplicates 0, rejected 1"), from_csv.stdout + from_csv.stderr
    assert "label: 'eleven' is not one of the configured classes" in from_csv.stdout
    assert count(server) == before + 149
    bad_token = subprocess.run(
        [sys.executable, "-m", "continual.cli", "ingest", str(csv), "--url", server.url, "--token", "nope"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad_token.returncode == 1 and "401 unauthorized" in bad_token.stderr and "Traceback" not in bad_token.stderr
