"""Property: whatever JSON reaches /v1/feedback, never a 5xx, and the store changes only on 200."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingestutil import CLASSES, b64, image_bytes, make_client, vector_settings

# Strings JSON allows but databases may not: NUL, unpaired surrogates (generated rarely on their own).
odd_text = st.sampled_from(["a\x00b", "\ud800", "x\udc00", "\x7f", "é"])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | odd_text
any_json = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=25,
)
numbers = st.integers(-(10**40), 10**40) | st.floats()
xs = st.lists(numbers, min_size=3, max_size=5) | st.lists(st.lists(numbers, max_size=4), max_size=4) | any_json
sample = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["a", "b", "c", "", "x" * 300]) | odd_text | any_json,
        "label": st.sampled_from([*CLASSES, "cow"]) | any_json,
        "x": xs,
        "image": st.sampled_from([b64(image_bytes()), "!!", b64(b"GIF89a")]) | any_json,
        "metadata": st.dictionaries(st.text(max_size=5), scalars, max_size=3) | any_json,
        "extra": any_json,
    },
)
# Mostly plausible documents, so some batches pass and ids collide across examples.
docs = st.fixed_dictionaries({"samples": st.lists(sample, max_size=6)}) | any_json
bodies = docs.map(lambda d: json.dumps(d, allow_nan=True).encode()) | st.binary(max_size=200)


def test_random_bodies_never_5xx_and_only_200_changes_the_store(tmp_path: Path, store_url: str) -> None:
    s = vector_settings(tmp_path, ingest={"max_batch_samples": 5, "max_body_bytes": 4096})
    client, store, _ = make_client(s, store_url)
    seen = {"200": 0}

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=bodies)
    def check(body: bytes) -> None:
        before = store.count()
        r = client.post("/v1/feedback", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, r.text
        after = store.count()
        if r.status_code == 200:
            seen["200"] += 1
            assert after - before == r.json()["accepted"]
        else:
            assert after == before, (r.status_code, r.text)
            assert set(r.json()) == {"error"}

    check()
    assert seen["200"] > 0  # the strategy does reach the success path


def _mangle(data: bytes, cuts: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, byte in cuts:
        out[pos % len(out)] = byte
    return bytes(out)


# Valid PNG/JPEG files with bytes flipped or cut short: the decoder must refuse them cleanly.
mangled = st.builds(
    lambda data, cuts, keep: _mangle(data, cuts)[:keep],
    st.sampled_from([image_bytes(), image_bytes(fmt="JPEG"), image_bytes(mode="L", w=40, h=30)]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(1, 2000),
)


def test_mangled_images_never_5xx(tmp_path: Path) -> None:
    from ingestutil import image_settings

    client, store, _ = make_client(image_settings(tmp_path), f"sqlite:///{tmp_path / 'store.db'}")

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=mangled)
    def check(data: bytes) -> None:
        before = store.count()
        body = json.dumps({"samples": [{"label": "cat", "image": b64(data)}]}).encode()
        r = client.post("/v1/feedback", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (200, 422), r.text
        assert store.count() - before == (r.json()["accepted"] if r.status_code == 200 else 0)

    check()
