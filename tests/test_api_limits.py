"""What one request may cost a real ``continual serve``: decoded pixels, JSON nesting, exclusions.

One server (an image ``mlp`` champion at 32x32, so it starts fast) on a loopback port
for the module; every test leaves the store as it found it, or says what it added.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from serverutil import ServerProcess

from continual.config import IngestSettings, load_settings
from continual.models import build_model
from continual.store import Store

pytestmark = pytest.mark.slow

INGEST, ADMIN = "ingest-token", "admin-token"
HI = {"Authorization": f"Bearer {INGEST}"}
HA = {"Authorization": f"Bearer {ADMIN}"}
CLASSES = ["cat", "dog", "bird"]
CONFIG: dict[str, Any] = {
    "auth": {"enabled": True, "ingest_tokens": [INGEST], "admin_tokens": [ADMIN]},
    "model": {"classes": CLASSES, "input": {"kind": "image", "size": [32, 32]}},
    "serving": {"device": "cpu"},
}
DEFAULTS = IngestSettings()


@cache
def png(w: int, h: int, mode: str = "1") -> str:
    """A flat PNG, base64: 5000x5000 at 1 bit per pixel is ~4 KB and decodes to 25 MP."""
    buf = io.BytesIO()
    Image.new(mode, (w, h), 0 if mode == "1" else 128).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    s = ServerProcess(CONFIG, workdir=tmp)
    settings = load_settings(s.config_path, env=s.env)
    torch.manual_seed(0)
    save_file(build_model(settings.model).state_dict(), tmp / "champion.safetensors")
    s.cli("db", "upgrade")
    s.cli("models", "import", str(tmp / "champion.safetensors"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def store(server: ServerProcess) -> Iterator[Store]:
    settings = load_settings(server.config_path, env=server.env)
    st = Store.from_settings(settings)
    yield st
    st.dispose()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def peak_rss_since_reset(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak_rss(pid: int) -> int:
    """Reset VmHWM to the current RSS (``clear_refs`` 5); returns that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss_since_reset(pid)[0]


# -- 1. decoded pixels ----------------------------------------------------------------------------------
def test_pixel_budget_refuses_a_request_before_decoding_any_image(
    server: ServerProcess, http: httpx.Client, store: Store
) -> None:
    bomb = png(5000, 5000)  # 25 MP each: 64 of them are 1.6 billion pixels in a 270 KB body
    samples = [{"id": f"bomb-{i}", "label": "cat", "image": bomb} for i in range(64)]
    for path, body in (("/v1/feedback", {"samples": samples}), ("/v1/predict", {"inputs": [{"image": bomb}] * 64})):
        r = http.post(path, json=body, headers=HI)
        assert r.status_code == 413, (path, r.status_code, r.text[:500])
        err = r.json()["error"]
        assert err["code"] == "decoded_too_large", err
        assert f"ingest.max_request_pixels = {DEFAULTS.max_request_pixels}" in err["message"], err
        assert "1600000000 pixels" in err["message"], err
    assert store.count() == 0
    assert http.get("/healthz").status_code == 200


def test_default_per_image_cap_refuses_a_25_megapixel_image(http: httpx.Client, store: Store) -> None:
    r = http.post(
        "/v1/feedback", json={"samples": [{"id": "huge", "label": "cat", "image": png(5000, 5000)}]}, headers=HI
    )
    assert r.status_code == 422, r.text[:500]
    [detail] = r.json()["error"]["details"]
    assert (detail["index"], detail["field"]) == (0, "image")
    assert f"exceeds ingest.max_image_pixels = {DEFAULTS.max_image_pixels}" in detail["message"], detail
    r = http.post("/v1/predict", json={"inputs": [{"image": png(5000, 5000)}]}, headers=HI)
    assert r.status_code == 422, r.text[:500]
    assert store.count() == 0


def test_requests_hold_one_full_size_image_at_a_time(server: ServerProcess, http: httpx.Client, store: Store) -> None:
    """16 images at the per-image cap (4096x4096 gray): the budget's limit, decoded one after another."""
    side = int(DEFAULTS.max_image_pixels**0.5)
    n = DEFAULTS.max_request_pixels // DEFAULTS.max_image_pixels
    assert side * side == DEFAULTS.max_image_pixels and n >= 8
    image = png(side, side, "L")
    one_image = side * side  # bytes of one decoded gray image
    assert server.proc is not None
    pid = server.proc.pid
    assert http.post("/v1/predict", json={"inputs": [{"image": png(64, 64, "L")}]}, headers=HI).status_code == 200
    for path, body in (
        ("/v1/predict", {"inputs": [{"image": image}] * n}),
        ("/v1/feedback", {"samples": [{"id": f"big-{i}", "label": "dog", "image": image} for i in range(n)]}),
    ):
        before = reset_peak_rss(pid)
        r = http.post(path, json=body, headers=HI)
        assert r.status_code == 200, (path, r.text[:500])
        growth = peak_rss_since_reset(pid)[1] - before
        # All n alive at once would be n x 16 MiB (+ an RGB copy); one at a time stays near one image.
        assert growth < 6 * one_image, f"{path}: peak RSS grew by {growth / 2**20:.0f} MiB for {n} images"
    assert store.count() == n


# -- 4. nesting ---------------------------------------------------------------------------------------
DEEP = "[" * 1000 + "]" * 1000


def raw(**fields: str) -> str:
    """A JSON object from JSON texts: ``raw(label=DEEP)`` nests where json.dumps would recurse."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


def feedback_text(second: str) -> str:
    ok = json.dumps({"id": "n0", "label": "cat", "image": png(8, 8, "L")})
    return '{"samples": [' + ok + ", " + second + "]}"


SMALL = json.dumps(png(8, 8, "L"))


@pytest.mark.parametrize(
    ("sample", "field", "words"),
    [
        (raw(id='"n1"', label='"cat"', image=SMALL, metadata=raw(a=DEEP)), "metadata", "nested deeper than"),
        (raw(id='"n1"', label=DEEP, image=SMALL), "label", "expected a string"),
        (raw(id='"n1"', label='"cat"', image=SMALL, metadata=raw(a=json.dumps([0] * 200_000))), "metadata",
         "ingest.max_metadata_bytes"),
    ],
    ids=["deep-metadata", "deep-label", "huge-metadata"],
)  # fmt: skip
def test_deep_or_oversized_json_is_refused_with_422(
    http: httpx.Client, store: Store, sample: str, field: str, words: str
) -> None:
    r = http.post("/v1/feedback", content=feedback_text(sample), headers={**HI, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:500]
    details = r.json()["error"]["details"]
    assert [(d["index"], d["field"]) for d in details] == [(1, field)], details
    assert words in details[0]["message"], details
    assert store.count(label="cat") == 0
    assert http.get("/healthz").status_code == 200


# -- 5. exclusions -----------------------------------------------------------------------------------
def post_exclude(http: httpx.Client, text: str) -> httpx.Response:
    return http.post("/v1/samples/exclude", content=text, headers={**HA, "Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("text", "field", "index"),
    [
        (raw(ids='["ok", "\\ud800"]', reason='"r"'), "ids", 1),  # a lone surrogate (500 on SQLite before)
        (raw(ids='["a\\u0000b"]', reason='"r"'), "ids", 0),  # NUL (PostgreSQL cannot store it)
        (raw(ids=json.dumps(["ok", "x" * 256]), reason='"r"'), "ids", 1),
        (raw(ids='["ok", 7]', reason='"r"'), "ids", 1),
        (raw(ids='["ok"]', reason="5"), "reason", None),
        (raw(ids='["ok"]', reason='"a\\u0000b"'), "reason", None),
        (raw(ids='["ok"]', reason='"\\udc00"'), "reason", None),
        (raw(ids='["ok"]', reason=json.dumps("r" * 1001)), "reason", None),
        (raw(ids='["ok"]', reason=DEEP), "reason", None),
    ],
    ids=["surrogate", "nul", "long", "number", "reason-number", "reason-nul", "reason-surrogate", "reason-long",
         "reason-deep"],
)  # fmt: skip
def test_exclude_validates_ids_and_reason_like_feedback(
    http: httpx.Client, store: Store, text: str, field: str, index: int | None
) -> None:
    r = post_exclude(http, text)
    assert r.status_code == 422, r.text[:500]
    details = r.json()["error"]["details"]
    assert [(d.get("index"), d["field"]) for d in details] == [(index, field)], details
    assert store.records.events(kind="samples_excluded") == []


def test_exclude_commits_the_exclusion_with_its_event(http: httpx.Client, store: Store) -> None:
    r = http.post(
        "/v1/feedback", json={"samples": [{"id": "ex-1", "label": "bird", "image": png(8, 8, "L")}]}, headers=HI
    )
    assert r.status_code == 200, r.text
    r = post_exclude(http, '{"ids": ["ex-1", "ex-missing"], "reason": "mislabeled"}')
    assert r.status_code == 200 and r.json() == {"excluded": 1, "unknown": ["ex-missing"]}, r.text
    [event] = store.records.events(kind="samples_excluded")
    assert event["data"]["reason"] == "mislabeled" and event["data"]["n"] == 1
    assert store.count(label="bird") == 0


def test_an_exclusion_of_200k_ids_is_refused_without_harm(http: httpx.Client) -> None:
    ids = [f"sample-{i:06d}" for i in range(200_000)]
    r = http.post("/v1/samples/exclude", json={"ids": ids, "reason": "bulk"}, headers=HA)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text[:300]
    assert http.get("/healthz").status_code == 200
