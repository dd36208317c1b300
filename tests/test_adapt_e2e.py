"""A real ``continual serve`` on loopback: predictions are logged, the label queue hands them out (leased,
disjoint, validated), labels come back by prediction id, and a run adapts (DANN) on the logged inputs."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from serverutil import ServerProcess
from testkit import digit_arrays, wait_for

from continual.config import load_settings
from continual.demo.digits import shift
from continual.models import build_model
from continual.registry import Registry
from continual.store import Store

pytestmark = pytest.mark.slow

INGEST, ADMIN = "ingest-token-adapt", "admin-token-adapt"
H, A = {"Authorization": f"Bearer {INGEST}"}, {"Authorization": f"Bearer {ADMIN}"}
CONFIG: dict[str, Any] = {
    "auth": {"enabled": True, "ingest_tokens": [INGEST], "admin_tokens": [ADMIN]},
    "serving": {"device": "cpu", "poll_interval_seconds": 0.5, "log_flush_seconds": 0.05},
    "triggers": {"check_interval_seconds": 0.5, "min_new_samples": 100_000, "max_new_samples": 100_000},
    "training": {"epochs": 2, "device": "cpu", "cpu_threads": 1, "adaptation": "dann", "learning_rate": 3e-3},
    "adaptation": {"min_target_samples": 20, "target": "latest"},
    "label_queue": {"max_k": 50, "lease_seconds": 300},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(CONFIG, workdir=tmp_path_factory.mktemp("adapt") / "server")
    srv.start()
    yield srv
    srv.stop()


def _store(server: ServerProcess) -> Store:
    return Store.from_settings(load_settings(server.config_path, env=server.env))


def _champion(server: ServerProcess) -> str:
    settings = load_settings(server.config_path, env=server.env)
    torch.manual_seed(0)
    store = _store(server)
    try:
        version = (
            Registry(settings.models_dir, store)
            .import_model(build_model(settings.model), input_spec=settings.model.input.model_dump(mode="json"))
            .version
        )
    finally:
        store.dispose()

    def serving() -> bool:
        r = httpx.post(server.url + "/v1/predict", json={"inputs": [{"x": [0.0] * 64}]}, headers=H, timeout=10)
        return r.status_code == 200 and r.json()["model_version"] == version

    wait_for(serving, 60, f"serving {version}", 0.1)
    return version


def test_queue_then_labels_then_a_run_that_adapts_on_logged_inputs(server: ServerProcess) -> None:
    _champion(server)
    x, y = digit_arrays()
    samples = [{"id": f"d{i}", "label": str(int(y[i])), "x": x[i].tolist()} for i in range(400)]
    assert httpx.post(server.url + "/v1/feedback", json={"samples": samples}, headers=H, timeout=60).status_code == 200
    shifted = shift(x[400:520].reshape(-1, 8, 8), "inverted").reshape(-1, 64)
    r = httpx.post(server.url + "/v1/predict", json={"inputs": [{"x": v.tolist()} for v in shifted]}, headers=H)
    assert r.status_code == 200
    store = _store(server)
    try:
        wait_for(lambda: store.predictions.count() >= 121, 30, "the prediction log")

        for bad in ("0", "51", "-3", "many"):
            r = httpx.get(server.url + "/v1/label-queue", params={"k": bad}, headers=H)
            assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed", (bad, r.text)
        assert httpx.get(server.url + "/v1/label-queue", params={"k": 5}).status_code == 401

        def ask(_: int) -> list[dict[str, Any]]:
            r = httpx.get(server.url + "/v1/label-queue", params={"k": 10}, headers=H, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["items"]  # type: ignore[no-any-return]

        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(ask, range(2))
        assert len(a) == len(b) == 10
        assert not {i["prediction_id"] for i in a} & {i["prediction_id"] for i in b}
        item = a[0]
        assert len(item["x"]) == 64 and 0 <= item["confidence"] <= 1 and item["margin"] >= 0
        assert item["label"] in [str(c) for c in range(10)] and item["leased_until"]
        metrics = httpx.get(server.url + "/metrics").text
        assert "continual_label_queue_items_total 20.0" in metrics
        status = httpx.get(server.url + "/v1/status", headers=H, timeout=30).json()
        assert status["label_queue"] == {"strategy": "typical", "leased": 20}, status.get("label_queue")

        # Labels come back by prediction id; those inputs become samples (some land in the holdout).
        labeled = a[:6]
        by_ref = [{"prediction_id": i["prediction_id"], "label": "0"} for i in labeled]
        r = httpx.post(server.url + "/v1/feedback", json={"samples": by_ref}, headers=H)
        assert r.status_code == 200 and r.json()["accepted"] == 6, r.text
        splits = {s.external_id: s.split for batch in store.iter_samples() for s in batch}
        in_holdout = sum(splits[f"prediction:{i['prediction_id']}"] == "holdout" for i in labeled)

        r = httpx.post(server.url + "/v1/train", headers=A, timeout=30)
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        row = wait_for(
            lambda: (lambda row: row if row["status"] in ("succeeded", "failed", "cancelled") else None)(
                store.runs.get(run_id)
            ),
            240,
            "the run",
        )
        assert row["status"] == "succeeded", (row["error"], server.log_tail())
        info = row["metrics"]["adaptation"]
        assert info["method"] == "dann" and "skipped" not in info, info
        # Every logged input (the zero probe, 120 shifted digits) but those that became holdout samples.
        assert info["target"]["n"] == 121 - in_holdout, (info, in_holdout)
        assert all("domain_loss" in h for h in row["metrics"]["history"])
        assert np.isfinite(row["metrics"]["final_loss"])
    finally:
        store.dispose()
