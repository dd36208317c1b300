from __future__ import annotations

from pathlib import Path

from ingestutil import make_client, vector_settings

from continual.cli import main


def test_exclude_by_id_needs_admin_and_takes_samples_out(tmp_path: Path, store_url: str) -> None:
    settings = vector_settings(tmp_path, auth={"enabled": True, "ingest_tokens": ["in"], "admin_tokens": ["ad"]})
    client, store, _ = make_client(settings, store_url)
    samples = [{"id": f"s{i}", "label": "cat", "x": [float(i)] * 4} for i in range(10)]
    assert (
        client.post("/v1/feedback", json={"samples": samples}, headers={"Authorization": "Bearer in"}).status_code
        == 200
    )
    body = {"ids": ["s1", "s2", "missing"], "reason": "poisoned batch"}
    assert client.post("/v1/samples/exclude", json=body, headers={"Authorization": "Bearer in"}).status_code == 403
    r = client.post("/v1/samples/exclude", json=body, headers={"Authorization": "Bearer ad"})
    assert r.status_code == 200 and r.json() == {"excluded": 2, "unknown": ["missing"]}
    assert store.count() == 8
    [event] = store.records.events(kind="samples_excluded")
    assert event["data"]["reason"] == "poisoned batch" and event["data"]["n"] == 2
    for bad in ({}, {"ids": []}, {"ids": "s1"}, {"ids": [1, 2]}, {"ids": [""]}):
        r = client.post("/v1/samples/exclude", json=bad, headers={"Authorization": "Bearer ad"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", bad
    assert store.count() == 8


def test_cli_exclude(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[service]\ndata_dir = "{tmp_path}"\n[model]\narchitecture = "mlp"\nweights = "none"\n'
        'classes = ["a", "b"]\n[model.input]\nkind = "vector"\nshape = [4]\n'
    )
    assert main(["db", "upgrade", "--config", str(cfg)]) == 0
    from continual.config import load_settings
    from continual.store import NewSample, Store

    store = Store.from_settings(load_settings(cfg, env={}))
    store.insert([NewSample(f"s{i}", "a", "vector", bytes([i]) * 16) for i in range(5)])
    (tmp_path / "ids.txt").write_text("s3\ns4\n")
    assert main(["samples", "exclude", "s1", "--file", str(tmp_path / "ids.txt"), "--config", str(cfg)]) == 0
    assert "excluded 3 samples" in capsys.readouterr().out
    assert store.count() == 2
