"""Delayed labels over HTTP against real ``continual serve`` processes: prediction ids, feedback by
reference and its errors, the prediction log under a full queue, live accuracy per version."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from serverutil import ServerProcess
from testkit import digit_arrays, merge, wait_for

from continual.client import Client, label_sample
from continual.config import load_settings
from continual.models import build_model
from continual.registry import Registry
from continual.store import Store

INGEST = "ingest-token-delayed"
H = {"Authorization": f"Bearer {INGEST}"}
CONFIG: dict[str, Any] = {
    "auth": {"enabled": True, "ingest_tokens": [INGEST]},
    "serving": {"device": "cpu", "max_batch": 16, "poll_interval_seconds": 0.5, "log_flush_seconds": 0.05},
    "accuracy": {"interval_seconds": 0.5, "estimate_window": 10, "live_window": 50},
}
PID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def import_weights(server: ServerProcess, seed: int) -> str:
    """What ``continual models import`` does (in this process: no CLI start-up): a fresh MLP becomes champion."""
    settings = load_settings(server.config_path, env=server.env)
    torch.manual_seed(seed)
    with open_store(server) as store:
        m = Registry(settings.models_dir, store).import_model(
            build_model(settings.model), input_spec=settings.model.input.model_dump(mode="json"), actor="test"
        )
    version = m.version

    def serving() -> bool:
        r = httpx.post(server.url + "/v1/predict", json={"inputs": [{"x": [0.0] * 64}]}, headers=H, timeout=10)
        return r.status_code == 200 and r.json()["model_version"] == version

    wait_for(serving, 60, f"serving {version}", 0.1)
    return version


class open_store:
    def __init__(self, server: ServerProcess) -> None:
        self.store = Store.from_settings(load_settings(server.config_path, env=server.env))

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.dispose()


def predict(server: ServerProcess, xs: np.ndarray) -> dict[str, Any]:
    r = httpx.post(server.url + "/v1/predict", json={"inputs": [{"x": x.tolist()} for x in xs]}, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def feedback(server: ServerProcess, samples: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(server.url + "/v1/feedback", json={"samples": samples}, headers=H, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("delayed")
    srv = ServerProcess(CONFIG, workdir=tmp / "server")
    srv.start()
    srv.versions = [import_weights(srv, 1)]  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def test_predict_then_label_by_id_stores_the_logged_input(server: ServerProcess) -> None:
    x, _ = digit_arrays()
    body = predict(server, x[:3])
    pids = [p["prediction_id"] for p in body["predictions"]]
    assert all(PID.match(p) for p in pids) and len(set(pids)) == 3 and pids == sorted(pids)
    # At once, before the log writer's own flush: the service writes what it holds and looks again.
    r = feedback(server, [
        {"prediction_id": pids[0], "label": "0"},
        {"prediction_id": pids[1], "label": "1", "id": "reviewer/17"},
        {"prediction_id": pids[2], "label": "2", "metadata": {"by": "support"}},
    ])  # fmt: skip
    assert r.status_code == 200 and r.json() == {"accepted": 3, "duplicates": 0}, r.text
    with open_store(server) as store:
        rows = {r.external_id: r for b in store.iter_samples() for r in b}
        logged = store.predictions.get_many(pids)
    for i, (sample_id, label) in enumerate([(f"prediction:{pids[0]}", "0"), ("reviewer/17", "1"),
                                             (f"prediction:{pids[2]}", "2")]):  # fmt: skip
        row = rows[sample_id]
        assert row.payload == x[i].astype("<f4").tobytes() and row.kind == "vector" and row.label == label
        assert row.split in ("train", "holdout") and row.source == "api"
        p = logged[pids[i]]
        assert (p.true_label, p.sample_id, p.model_version) == (label, sample_id, body["model_version"])
        assert p.label == body["predictions"][i]["label"]
        assert p.confidence == pytest.approx(body["predictions"][i]["confidence"])
    assert rows[f"prediction:{pids[2]}"].meta == {"by": "support"}

    # The same label again is a duplicate (also through the client); another label is a 409, as for sample ids.
    with Client(server.url, INGEST) as c:
        assert c.feedback([label_sample(pids[0], "0"), label_sample(pids[2], "2")]).duplicates == 2
    r = feedback(server, [{"prediction_id": pids[1], "label": "1", "id": "reviewer/17"},
                          {"prediction_id": pids[0], "label": "9"}])  # fmt: skip
    assert r.status_code == 409 and r.json()["error"]["code"] == "id_conflict"
    assert [(d["index"], d["field"], d["id"]) for d in r.json()["error"]["details"]] == [
        (1, "id", f"prediction:{pids[0]}")
    ]
    text = httpx.get(server.url + "/metrics").text
    assert (metric(text, "continual_label_delay_seconds_count") or 0) >= 3
    assert (metric(text, "continual_prediction_log_written_total") or 0) >= 3


def test_every_error_of_feedback_by_reference_names_the_sample(server: ServerProcess) -> None:
    x, _ = digit_arrays()
    [known] = [p["prediction_id"] for p in predict(server, x[10:11])["predictions"]]
    with open_store(server) as store:
        before = store.count()
    unknown = "01J0000000000000000000NONE"
    r = feedback(server, [{"prediction_id": known, "label": "3"}, {"prediction_id": unknown, "label": "3"}])
    err = r.json()["error"]
    assert r.status_code == 422 and err["code"] == "unknown_prediction"
    assert err["details"] == [{"index": 1, "field": "prediction_id", "id": unknown,
                               "message": "no logged prediction has this id"}]  # fmt: skip
    assert "nothing stored" in err["message"]
    r = feedback(server, [
        {"prediction_id": known, "label": "3", "x": [0.0] * 64},
        {"prediction_id": 17, "label": "3"},
        {"prediction_id": known, "label": "eleven"},
        {"prediction_id": known},
    ])  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed"
    assert [(d["index"], d["field"]) for d in r.json()["error"]["details"]] == [
        (0, "x"), (1, "prediction_id"), (2, "label"), (3, "label")
    ]  # fmt: skip
    with open_store(server) as store:
        assert store.count() == before  # a rejected batch stores nothing
    assert feedback(server, [{"prediction_id": known, "label": "3"}]).json() == {"accepted": 1, "duplicates": 0}
    text = httpx.get(server.url + "/metrics").text
    assert (metric(text, "continual_feedback_rejected_total", reason="validation") or 0) >= 6


def test_live_accuracy_per_version_and_estimates_in_status_and_metrics(server: ServerProcess, tmp_path: Path) -> None:
    x, y = digit_arrays()
    first = server.versions[0]  # type: ignore[attr-defined]
    # v1 answers 30 inputs, labeled with the truth (a random MLP: mostly wrong).
    body = predict(server, x[100:116])
    body2 = predict(server, x[116:130])
    answers = body["predictions"] + body2["predictions"]
    assert (
        feedback(server, [label_sample(p["prediction_id"], str(y[100 + i])) for i, p in enumerate(answers)]).status_code
        == 200
    )
    second = import_weights(server, 2)
    # v2 answers 20 inputs; each label is what it answered (all right).
    answers2 = predict(server, x[200:216])["predictions"] + predict(server, x[216:220])["predictions"]
    assert feedback(server, [label_sample(p["prediction_id"], p["label"]) for p in answers2]).status_code == 200
    right1 = sum(p["label"] == str(y[100 + i]) for i, p in enumerate(answers))

    def accuracy() -> dict[str, Any] | None:
        status = httpx.get(server.url + "/v1/status", headers=H).json()["accuracy"]
        by_version = {v["version"]: v for v in status["versions"]}
        done = by_version.get(second, {}).get("n") == 20 and status["last_window"] is not None
        return status if done and status["last_window"]["model_version"] == second else None

    status = wait_for(accuracy, 30, "live accuracy of both versions and a window of the new champion")
    v2, v1 = status["versions"][:2]
    assert (v2["version"], v2["champion"], v2["n"], v2["accuracy"]) == (second, True, 20, 1.0)
    assert v2["upper"] == 1.0 and 0.8 < v2["lower"] < 0.9  # Wilson 95% for 20 of 20
    assert v1["version"] == first and v1["champion"] is False
    assert v1["n"] >= 30 and v1["correct"] >= right1  # (earlier tests labeled some of v1's answers too)
    assert v1["gate_accuracy"] is None  # imported: never gated
    window = status["last_window"]
    assert window["n"] == 10 and window["estimates"]["atc"] is None  # imported: no calibration ...
    assert 0 < window["estimates"]["confidence"] <= 1
    assert any(f.startswith("uncalibrated") for f in window["flags"])  # ... and flagged so

    def exported() -> str | None:
        text = httpx.get(server.url + "/metrics").text
        return text if metric(text, "continual_live_accuracy_count", version=second) == 20 else None

    text = wait_for(exported, 30, "live accuracy in /metrics")
    assert metric(text, "continual_live_accuracy_ratio", version=second) == 1.0
    assert metric(text, "continual_live_accuracy_upper_ratio", version=second) == 1.0
    assert metric(text, "continual_live_accuracy_ratio", version=first) is not None
    assert metric(text, "continual_estimated_accuracy_ratio", method="confidence") is not None
    assert metric(text, "continual_estimate_flagged") == 1.0
    out = server.cli("status").stdout
    assert f"{second}  champion  live  1.000 [" in out and "n=20" in out
    assert "estimated accuracy (window #" in out and "flag: uncalibrated" in out


@pytest.mark.slow
def test_input_not_logged_names_the_policy(tmp_path: Path) -> None:
    srv = ServerProcess(merge(CONFIG, {"serving": {"log_inputs": "none"}}), workdir=tmp_path / "server")
    srv.start()
    try:
        import_weights(srv, 1)
        x, _ = digit_arrays()
        [none] = [p["prediction_id"] for p in predict(srv, x[:1])["predictions"]]
        srv.stop()
        srv.env.update({"CONTINUAL_SERVING__LOG_INPUTS": "sampled", "CONTINUAL_SERVING__LOG_SAMPLE_RATE": "0"})
        srv.start()
        wait_for(lambda: httpx.get(srv.url + "/readyz").status_code == 200, 60, "ready after the restart")
        [sampled] = [p["prediction_id"] for p in predict(srv, x[1:2])["predictions"]]
        r = feedback(srv, [{"prediction_id": none, "label": "0"}, {"prediction_id": sampled, "label": "1"}])
        err = r.json()["error"]
        assert r.status_code == 422 and err["code"] == "input_not_logged"
        assert [(d["index"], d["field"], d["id"]) for d in err["details"]] == [
            (0, "prediction_id", none), (1, "prediction_id", sampled)
        ]  # fmt: skip
        assert "log_inputs = 'none'" in err["details"][0]["message"]
        assert "log_inputs = 'sampled'" in err["details"][1]["message"]
        assert "send the sample with its input" in err["message"]
        # Sent with its input instead, the same sample is stored.
        assert feedback(srv, [{"label": "0", "x": x[0].tolist()}]).json()["accepted"] == 1
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_full_log_queue_drops_records_and_never_fails_a_request(tmp_path: Path) -> None:
    # Room for 4 records, flushed only every 5 s: nearly every prediction finds the queue full.
    cfg = merge(CONFIG, {"serving": {"log_queue_size": 4, "log_flush_rows": 1_000, "log_flush_seconds": 5}})
    srv = ServerProcess(cfg, workdir=tmp_path / "server")
    srv.start()
    try:
        import_weights(srv, 1)
        x, _ = digit_arrays()
        body = {"inputs": [{"x": v.tolist()} for v in x[:16]]}
        statuses: list[int] = []
        ids: list[str] = []

        def client() -> None:
            with httpx.Client(base_url=srv.url, headers=H, timeout=30) as http:
                for _ in range(10):
                    r = http.post("/v1/predict", json=body)
                    statuses.append(r.status_code)
                    ids.extend(p["prediction_id"] for p in r.json()["predictions"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * 40 and len(set(ids)) == 40 * 16  # every request answered, every id new
        text = httpx.get(srv.url + "/metrics").text
        dropped = metric(text, "continual_prediction_log_dropped_total", reason="queue_full") or 0
        assert dropped >= 40 * 16 - 4 * 2  # at most a couple of 5 s flushes got through
        # An answered prediction whose record was dropped is unknown to feedback by reference.
        r = feedback(srv, [{"prediction_id": ids[-1], "label": "3"}])
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_prediction"
    finally:
        srv.stop()


@pytest.mark.slow
def test_the_importer_sends_labels_by_prediction_id_from_a_csv(server: ServerProcess, tmp_path: Path) -> None:
    x, y = digit_arrays()
    pids = [p["prediction_id"] for p in predict(server, x[300:305])["predictions"]]
    csv = tmp_path / "labels.csv"
    lines = ["prediction_id,label,reviewer", *[f"{p},{y[300 + i]},ann" for i, p in enumerate(pids)]]
    lines.append("01J0000000000000000000NONE,3,ann")  # unknown: reported, the rest go in
    csv.write_text("\n".join(lines) + "\n")
    args = ("ingest", str(csv), "--url", server.url, "--token", INGEST, "--quiet")
    out = server.cli(*args).stdout
    assert "accepted 5, duplicates 0, rejected 1" in out and "no logged prediction has this id" in out
    assert "accepted 0, duplicates 5, rejected 1" in server.cli(*args).stdout  # resumable
    with open_store(server) as store:
        rows = {r.external_id: r for b in store.iter_samples() for r in b}
    assert rows[f"prediction:{pids[0]}"].meta == {"reviewer": "ann"}
