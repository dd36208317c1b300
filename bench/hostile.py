"""What hostile requests make a real `continual serve` use: each answer, and its peak RSS against its idle RSS.

The service runs the default configuration except for the model: a tiny `mlp`
(weights "none", one hidden layer of 16) on the default 224x224 RGB input, so it
starts in seconds; every [ingest], [serving] and [store] limit is the default.
Requests, one after another:

- 64 PNGs of 5000x5000 at 1 bit per pixel (~4 KB of base64 each, 25 MP decoded)
  in one feedback and in one predict request,
- 16 gray PNGs of 4096x4096 (the per-image cap; together the whole request budget)
  in one predict and one feedback request: the most one request may decode,
- 8 large JPEGs (4000x3000, a phone photo) in feedback and predict, and 8 over the
  per-image cap (6000x4000),
- JSON nested 1,000 deep in `metadata`, in `label` and in a predict input, and a
  body nested 100,000 deep,
- an exclusion of 200,000 ids, and one of 10,000 (the most one request may name).

Prints each answer's status, the service's idle RSS (after a warm-up request) and
its peak RSS over the hostile requests (VmHWM, reset after the warm-up), then OK
when every answer is < 500, the service is healthy afterwards and the peak is
within idle + 1 GiB; MISSED otherwise.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from continual.config import load_settings  # noqa: E402
from continual.models import build_model  # noqa: E402
from tests.serverutil import ServerProcess  # noqa: E402

INGEST, ADMIN = "bench-ingest", "bench-admin"
CONFIG = {
    "service": {"log_level": "warning"},
    "auth": {"enabled": True, "ingest_tokens": [INGEST], "admin_tokens": [ADMIN]},
    "model": {"architecture": "mlp", "weights": "none", "hidden": [16], "input": {"kind": "image"}},
}
HI = {"Authorization": f"Bearer {INGEST}"}
HA = {"Authorization": f"Bearer {ADMIN}"}
TARGET_GROWTH = 2**30
DEEP = "[" * 1000 + "]" * 1000


def b64(img: Image.Image, fmt: str, **kw: object) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def photo(w: int, h: int) -> str:
    """A smooth colour pattern: under store.max_payload_bytes (1 MiB) at 12 MP, so feedback can store it."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1).astype(np.uint8)
    return b64(Image.fromarray(rgb), "JPEG", quality=85)


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def probe(url: str) -> int:
    """A probe's status on a fresh connection; 0 when there is no answer."""
    try:
        return httpx.get(url, timeout=30).status_code
    except httpx.TransportError:
        return 0


def raw(**fields: str) -> str:
    """A JSON object from JSON texts (to nest deeper than json.dumps would go)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


def main() -> None:
    bomb, cap_png = b64(Image.new("1", (5000, 5000)), "PNG"), b64(Image.new("L", (4096, 4096), 128), "PNG")
    phones, over_cap = photo(4000, 3000), photo(6000, 4000)
    small = json.dumps(b64(Image.new("RGB", (32, 32), (10, 20, 30)), "PNG"))
    print(
        f"payloads: 5000x5000 1-bit PNG {len(bomb) / 1024:.1f} KB base64, 4096x4096 gray PNG {len(cap_png) / 1024:.0f} KB, "
        f"4000x3000 JPEG {len(phones) / 2**20:.2f} MB, 6000x4000 JPEG {len(over_cap) / 2**20:.2f} MB"
    )
    with tempfile.TemporaryDirectory(prefix="continual-hostile-") as tmp:
        server = ServerProcess(CONFIG, workdir=Path(tmp))
        settings = load_settings(server.config_path, env=server.env)
        torch.manual_seed(0)
        save_file(build_model(settings.model).state_dict(), Path(tmp) / "champion.safetensors")
        server.cli("db", "upgrade")
        server.cli("models", "import", str(Path(tmp) / "champion.safetensors"))
        server.start()
        assert server.proc is not None
        pid = server.proc.pid
        http = httpx.Client(base_url=server.url, timeout=300)
        json_h = {"Content-Type": "application/json"}
        try:
            warm = http.post("/v1/predict", content=raw(inputs="[" + raw(image=small) + "]"), headers={**HI, **json_h})
            if warm.status_code != 200:
                raise SystemExit(f"warm-up predict failed: {warm.status_code} {warm.text[:300]}")
            idle = memory(pid)[0]
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak is the requests'
                peak_what = "since the warm-up"
            except OSError:
                peak_what = "over the process's life (clear_refs not writable)"

            def feedback(images: list[str], prefix: str) -> httpx.Response:
                samples = [{"id": f"{prefix}-{i}", "label": "1", "image": im} for i, im in enumerate(images)]
                return http.post("/v1/feedback", json={"samples": samples}, headers=HI)

            def predict(images: list[str]) -> httpx.Response:
                return http.post("/v1/predict", json={"inputs": [{"image": im} for im in images]}, headers=HI)

            def post(path: str, text: str, headers: dict[str, str]) -> httpx.Response:
                return http.post(path, content=text, headers={**headers, **json_h})

            ids = [f"sample-{i:06d}" for i in range(200_000)]
            cases: list[tuple[str, Callable[[], httpx.Response], int]] = [
                ("feedback, 64 PNGs 5000x5000 1-bit", lambda: feedback([bomb] * 64, "bomb"), 413),
                ("predict,  64 PNGs 5000x5000 1-bit", lambda: predict([bomb] * 64), 413),
                ("predict,  16 PNGs 4096x4096 (the budget)", lambda: predict([cap_png] * 16), 200),
                ("feedback, 16 PNGs 4096x4096 (the budget)", lambda: feedback([cap_png] * 16, "cap"), 200),
                ("feedback,  8 JPEGs 4000x3000", lambda: feedback([phones] * 8, "phone"), 200),
                ("predict,   8 JPEGs 4000x3000", lambda: predict([phones] * 8), 200),
                ("feedback,  8 JPEGs 6000x4000 (over the cap)", lambda: feedback([over_cap] * 8, "big"), 422),
                ("feedback, metadata nested 1,000 deep",
                 lambda: post("/v1/feedback", raw(samples="[" + raw(label='"1"', image=small, metadata=raw(a=DEEP)) + "]"), HI), 422),
                ("feedback, label nested 1,000 deep",
                 lambda: post("/v1/feedback", raw(samples="[" + raw(label=DEEP, image=small) + "]"), HI), 422),
                ("predict,  input nested 1,000 deep", lambda: post("/v1/predict", raw(inputs="[" + raw(image=DEEP) + "]"), HI), 422),
                ("feedback, body nested 100,000 deep",
                 lambda: post("/v1/feedback", "[" * 100_000 + "]" * 100_000, HI), 400),
                ("exclude,  200,000 ids", lambda: http.post("/v1/samples/exclude", json={"ids": ids, "reason": "bulk"}, headers=HA), 413),
                ("exclude,  10,000 ids", lambda: http.post("/v1/samples/exclude", json={"ids": ids[:10_000], "reason": "bulk"}, headers=HA), 200),
                ("exclude,  a lone surrogate in an id",
                 lambda: post("/v1/samples/exclude", raw(ids='["ok", "\\ud800"]', reason='"r"'), HA), 422),
            ]  # fmt: skip
            worst = 0
            for name, send, expected in cases:
                start = time.perf_counter()
                try:
                    r = send()
                except httpx.TransportError as e:  # the service dropped the connection: worse than a 500
                    worst = 600
                    print(f"{name:45s} no answer: {type(e).__name__}: {e}")
                    continue
                took = time.perf_counter() - start
                worst = max(worst, r.status_code)
                code = r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
                print(f"{name:45s} {r.status_code} {code:19s} (expected {expected}) {took:6.2f}s")
            peak = memory(pid)[1]
            health, ready = probe(server.url + "/healthz"), probe(server.url + "/readyz")
            alive = server.proc.poll() is None
        finally:
            http.close()
            server.stop()
    growth = peak - idle
    print(f"healthz {health}, readyz {ready}, process alive: {alive}")
    print(
        f"idle RSS {idle / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB {peak_what}: "
        f"+{growth / 2**20:.0f} MiB (target <= +{TARGET_GROWTH / 2**20:.0f} MiB), ratio peak/idle {peak / idle:.2f}"
    )
    ok = worst < 500 and health == 200 and ready == 200 and alive and growth <= TARGET_GROWTH
    print("OK" if ok else "MISSED")


if __name__ == "__main__":
    main()
