"""POST /v1/predict and the model routes against real ``continual serve`` processes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from serverutil import BASE_CONFIG, ServerProcess
from testkit import merge, wait_for

from continual.config import settings_from_dict
from continual.models import build_model

INGEST, ADMIN = "ingest-token-1", "admin-token-1"
POLL = 0.5
CONFIG: dict[str, Any] = {
    "auth": {"enabled": True, "ingest_tokens": [INGEST], "admin_tokens": [ADMIN]},
    "serving": {"poll_interval_seconds": POLL, "max_batch": 8, "device": "cpu"},
}
HI = {"Authorization": f"Bearer {INGEST}"}
HA = {"Authorization": f"Bearer {ADMIN}"}
X = [[float(i % 7) - 3.0 for i in range(64)], [0.5] * 64]


def weights_file(tmp: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(settings_from_dict(merge(BASE_CONFIG, CONFIG)).model).eval()
    path = tmp / f"w{seed}.safetensors"
    save_file(model.state_dict(), path)
    return path, model


def expected_scores(model: torch.nn.Module, x: list[list[float]]) -> list[list[float]]:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor(x)), dim=1).tolist()


def import_version(server: ServerProcess, path: Path, *, promote: bool = True) -> str:
    """What ``continual models import`` does, in this process (the CLI itself is tested in test_models_cli.py)."""
    from continual.config import load_settings
    from continual.registry import Registry
    from continual.store import Store

    settings = load_settings(server.config_path, env=server.env)
    store = Store.from_settings(settings)
    try:
        reg = Registry(settings.models_dir, store)
        model = build_model(settings.model, weights=str(path))
        m = reg.import_model(
            model, input_spec=settings.model.input.model_dump(mode="json"), promote=promote, actor="test"
        )
        return m.version
    finally:
        store.dispose()


def wait_for_version(url: str, version: str, timeout: float = 60.0) -> None:
    def serving() -> bool:
        r = httpx.post(url + "/v1/predict", json={"inputs": [{"x": X[0]}]}, headers=HI, timeout=10)
        return r.status_code == 200 and r.json()["model_version"] == version

    wait_for(serving, timeout, f"{url} serving {version}", 0.1)


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = ServerProcess(CONFIG, workdir=tmp_path / "server")
    s.start()
    yield s
    s.stop()


def test_predict_contract_errors_promote_and_rollback(server: ServerProcess, tmp_path: Path) -> None:
    url = server.url
    post = lambda path, body=None, h=HI: httpx.post(url + path, json=body, headers=h, timeout=30)  # noqa: E731

    r = post("/v1/predict", {"inputs": [{"x": X[0]}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_model"
    assert httpx.get(url + "/readyz").status_code == 503

    path_a, model_a = weights_file(tmp_path, 1)
    path_b, model_b = weights_file(tmp_path, 2)
    a = import_version(server, path_a)
    b = import_version(server, path_b, promote=False)
    wait_for_version(url, a)
    assert httpx.get(url + "/readyz").json() == {"ready": True, "store": True, "model": True}

    r = post("/v1/predict", {"inputs": [{"x": X[0]}, {"x": X[1]}]})
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == a and len(body["predictions"]) == 2
    classes = [str(i) for i in range(10)]
    for pred, exp in zip(body["predictions"], expected_scores(model_a, X), strict=True):
        assert list(pred["scores"]) == classes
        assert [pred["scores"][c] for c in classes] == pytest.approx(exp, abs=1e-5)
        assert pred["label"] == classes[max(range(10), key=exp.__getitem__)]
        assert pred["confidence"] == pytest.approx(max(exp), abs=1e-5)

    # Bad input: the same 422 as feedback, naming the index and the field.
    r = post("/v1/predict", {"inputs": [{"x": X[0]}, {"x": [1.0] * 3}, {"image": "aGk="}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed"
    assert [(d["index"], d["field"]) for d in r.json()["error"]["details"]] == [(1, "x"), (2, "x")]
    assert post("/v1/predict", {"inputs": []}).status_code == 422
    assert post("/v1/predict", {"nothing": 1}).status_code == 422
    r = post("/v1/predict", {"inputs": [{"x": X[0]}] * 9})
    assert r.status_code == 413 and "max_batch = 8" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/predict", content=b"{not json", headers={**HI, "Content-Type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/predict", content=b"x", headers={**HI, "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert httpx.post(url + "/v1/predict", json={"inputs": [{"x": X[0]}]}).status_code == 401

    # Model routes: listing with ingest scope, changes with admin scope only.
    listing = httpx.get(url + "/v1/models", headers=HI).json()
    assert listing["champion"] == a and listing["serving"] == a
    assert [v["version"] for v in listing["versions"]] == [b, a] and listing["versions"][1]["champion"] is True
    assert post(f"/v1/models/{b}/promote").status_code == 403
    assert post("/v1/models/20200101T000000.000000-abcdef/promote", h=HA).status_code == 404
    assert post("/v1/models/rollback", h=HA).json()["error"]["code"] == "no_previous_champion"

    r = post(f"/v1/models/{b}/promote", h=HA)
    assert r.status_code == 200 and r.json() == {"champion": b, "previous": a, "serving": b}
    # The promoting process swaps before answering.
    r = post("/v1/predict", {"inputs": [{"x": X[0]}]})
    assert r.json()["model_version"] == b
    assert [r.json()["predictions"][0]["scores"][c] for c in classes] == pytest.approx(
        expected_scores(model_b, X[:1])[0], abs=1e-5
    )

    r = post("/v1/models/rollback", h=HA)
    assert r.status_code == 200 and r.json() == {"champion": a, "previous": b, "serving": a}
    assert post("/v1/predict", {"inputs": [{"x": X[0]}]}).json()["model_version"] == a
    history = httpx.get(url + "/v1/models", headers=HI).json()["history"]
    assert [(h["version"], h["reason"]) for h in history] == [(a, "rollback"), (b, "manual"), (a, "import")]
    assert history[0]["actor"].startswith("token:") and ADMIN not in history[0]["actor"]

    text = httpx.get(url + "/metrics").text
    assert f'continual_model_info{{architecture="mlp",version="{a}"}} 1.0' in text
    assert "continual_rollbacks_total 1.0" in text
    assert "continual_promotions_total 1.0" in text  # the manual promote of b (the import was not through the API)
    assert "continual_predict_latency_seconds_count" in text
    predicted = next(line for line in text.splitlines() if line.startswith("continual_predictions_total"))
    assert float(predicted.split()[1]) >= 4


@pytest.mark.slow
def test_hot_swap_under_load_fails_no_request(tmp_path: Path) -> None:
    """4 threads predict on two processes while the champion is swapped 20 times through the promote API."""
    shared = merge(CONFIG, {"service": {"data_dir": str(tmp_path / "data")}})
    s1 = ServerProcess(shared, workdir=tmp_path / "s1")
    s2 = ServerProcess(shared, workdir=tmp_path / "s2")
    path_a, model_a = weights_file(tmp_path, 1)
    path_b, model_b = weights_file(tmp_path, 2)
    s1.start()
    s2.start()
    try:
        a = import_version(s1, path_a)
        b = import_version(s1, path_b, promote=False)
        for s in (s1, s2):
            wait_for_version(s.url, a)
        expected = {a: expected_scores(model_a, X[:1])[0], b: expected_scores(model_b, X[:1])[0]}
        classes = [str(i) for i in range(10)]
        results: list[tuple[float, int, str]] = []
        failures: list[str] = []
        stop = threading.Event()

        def client(server: ServerProcess) -> None:
            with httpx.Client(base_url=server.url, headers=HI, timeout=30) as c:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        r = c.post("/v1/predict", json={"inputs": [{"x": X[0]}]})
                    except httpx.HTTPError as e:
                        failures.append(f"{type(e).__name__}: {e}")
                        continue
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                        continue
                    body = r.json()
                    v = body["model_version"]
                    got = [body["predictions"][0]["scores"][c] for c in classes]
                    # The answer really came from the version it names.
                    if v not in expected or got != pytest.approx(expected[v], abs=1e-5):
                        failures.append(f"version {v} answered scores of another model")
                    results.append((started, 1 if server is s1 else 2, v))

        threads = [threading.Thread(target=client, args=(s,)) for s in (s1, s1, s2, s2)]
        for t in threads:
            t.start()
        targets = [b if i % 2 == 0 else a for i in range(20)]
        with httpx.Client(base_url=s1.url, headers=HA, timeout=60) as admin:
            for target in targets:
                time.sleep(0.15)  # let requests overlap every swap
                r = admin.post(f"/v1/models/{target}/promote")
                assert r.status_code == 200, r.text
            last_swap_done = time.monotonic()
        final = targets[-1]
        time.sleep(POLL * 2 + 3)  # keep the load on past the other process's next polls
        stop.set()
        for t in threads:
            t.join()

        assert failures == []
        assert {v for _, _, v in results} == {a, b}
        served_1 = [v for started, srv, v in results if srv == 1 and started > last_swap_done]
        assert served_1 and set(served_1) == {final}  # the promoting process swapped before answering
        after_2 = sorted((started, v) for started, srv, v in results if srv == 2 and started > last_swap_done)
        # The other process may still answer with an older version for a moment, and
        # even switch to one more stale version: a poll that read the pointer just
        # before the last swap finishes loading after it. What matters is that it
        # converges on the final champion within about one poll, and stays there.
        stale = [i for i, (_, v) in enumerate(after_2) if v != final]
        settled = stale[-1] + 1 if stale else 0
        assert settled < len(after_2), "the other process never served the final champion"
        lag = after_2[settled][0] - last_swap_done
        assert after_2[-1][0] - after_2[settled][0] > POLL * 2  # and stayed on it across later polls
        print(f"the other process served {final} {lag:.2f}s after the last swap (poll interval {POLL}s)")
        assert lag <= POLL + 2.0  # one poll plus loading a small model on a busy machine
        assert len(results) > 100
    finally:
        s1.stop()
        s2.stop()


def test_image_predict_in_process(tmp_path: Path) -> None:
    """Images through the real app (FastAPI TestClient): PNG and JPEG in, ImageNet backbone, new head."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from continual.api import AppContext, create_app
    from continual.metrics import Metrics
    from continual.registry import Registry
    from continual.serving import Serving
    from continual.store import Store

    settings = settings_from_dict(
        {
            "service": {"data_dir": str(tmp_path)},
            "auth": {"enabled": False},
            "model": {"architecture": "efficientnet_lite0", "classes": ["cat", "dog"], "input": {"size": [32, 32]}},
            "serving": {"device": "cpu"},
        }
    )
    store = Store.from_settings(settings)
    store.upgrade()
    reg = Registry(settings.models_dir, store)
    m = reg.import_model(build_model(settings.model), input_spec=settings.model.input.model_dump(mode="json"))
    serving = Serving(settings)
    serving.sync(reg)
    client = TestClient(create_app(AppContext(settings, store, Metrics(), registry=reg, serving=serving)))

    def encoded(fmt: str, mode: str) -> str:
        buf = io.BytesIO()
        Image.new(mode, (50, 40), 128).save(buf, format=fmt)
        return base64.b64encode(buf.getvalue()).decode()

    r = client.post("/v1/predict", json={"inputs": [{"image": encoded("PNG", "RGB")}, {"image": encoded("JPEG", "L")}]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert r.json()["model_version"] == m.version and [set(p["scores"]) for p in preds] == [{"cat", "dog"}] * 2
    r = client.post("/v1/predict", json={"inputs": [{"image": "bm90IGFuIGltYWdl"}, {"x": [1.0, 2.0]}]})
    assert r.status_code == 422
    assert [(d["index"], d["field"]) for d in r.json()["error"]["details"]] == [(0, "image"), (1, "image")]
    store.dispose()
