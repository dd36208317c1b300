"""Predict latency and throughput through HTTP vs the same model called directly, in the same run.

A real ``continual serve`` child on a loopback port serves the champion; the
baseline is ``Serving.predict`` on already-decoded inputs in this process, with
the same weights, run in a worker thread like the server's. Sequential single-client calls, direct and HTTP in alternating blocks so both see
the same machine load; the ratio of the p50 latencies is the cost of HTTP, JSON, input decoding and the
thread hop. Default model: an MLP on 64-d vectors; ``--image`` uses
EfficientNet-Lite0 (ImageNet weights) on small PNG images.

    .venv/bin/python bench/predict.py [--seconds 8] [--image [--image-size 64]]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from continual.config import Settings, settings_from_dict
from continual.ingest import decode_inputs
from continual.models import build_model
from continual.registry import Registry
from continual.serving import Serving
from continual.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(data_dir: Path, image: bool, image_size: int) -> dict[str, Any]:
    model: dict[str, Any] = (
        {
            "architecture": "efficientnet_lite0",
            "weights": "imagenet",
            "input": {"kind": "image", "size": [image_size, image_size], "channels": 3},
        }
        if image
        else {
            "architecture": "mlp",
            "weights": "none",
            "hidden": [256, 256],
            "input": {"kind": "vector", "shape": [64]},
        }
    )
    model["classes"] = [str(i) for i in range(10)]
    return {
        "service": {"host": "127.0.0.1", "data_dir": str(data_dir), "log_level": "warning"},
        "auth": {"enabled": False},
        "model": model,
        "serving": {"device": "cpu", "max_batch": 64},
    }


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = (f"[{prefix}]\n" if prefix and lines else "") + "".join(line + "\n" for line in lines)
    for k, v in data.items():
        if isinstance(v, dict):
            out += "\n" + to_toml(v, f"{prefix}.{k}" if prefix else k)
    return out


def make_inputs(settings: Settings, n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    if settings.model.input.kind == "vector":
        return [{"x": rng.standard_normal(64).astype(np.float32).tolist()} for _ in range(n)]
    from PIL import Image

    h, w = settings.model.input.size
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append({"image": base64.b64encode(buf.getvalue()).decode()})
    return out


def summarise(latencies: list[float], batch: int, elapsed: float) -> tuple[float, float, float]:
    arr = np.asarray(latencies) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99)), len(latencies) * batch / elapsed


def measure(
    direct: Any, http: Any, seconds: float, block: float = 0.5, warmup: int = 10
) -> tuple[list[float], list[float]]:
    """Alternate half-second blocks of each path, so both see the same machine load (the team
    shares two cores) without one path's idle gaps landing inside the other's timings."""
    for _ in range(warmup):
        direct()
        http()
    lat: dict[int, list[float]] = {0: [], 1: []}
    start = time.perf_counter()
    turn = 0
    while time.perf_counter() - start < seconds:
        call = (direct, http)[turn]
        block_end = time.perf_counter() + block
        while time.perf_counter() < block_end:
            t = time.perf_counter()
            call()
            lat[turn].append(time.perf_counter() - t)
        turn ^= 1
    return lat[0], lat[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement time per batch size (both paths)")
    parser.add_argument("--image", action="store_true", help="EfficientNet-Lite0 on PNG images instead of the MLP")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="continual-bench-predict-"))
    cfg = config(tmp / "data", args.image, args.image_size)
    settings = settings_from_dict(cfg)
    (tmp / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    store = Store.from_settings(settings)
    store.upgrade()
    reg = Registry(settings.models_dir, store)
    torch.manual_seed(0)
    model = build_model(settings.model)
    m = reg.write_version(
        model.state_dict(),
        architecture=settings.model.architecture,
        classes=settings.model.classes,
        input_spec=settings.model.input.model_dump(mode="json"),
        parent=None,
        data_cutoff=0,
    )
    reg.promote(m.version, expected=reg.store.versions.champion_version(), reason="import", actor="bench")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
    env.update({"CONTINUAL_CONFIG": str(tmp / "config.toml"), "CONTINUAL_SERVICE__PORT": str(port)})
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    server = subprocess.Popen([sys.executable, "-m", "continual.cli", "serve"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print((tmp / "server.log").read_text(), file=sys.stderr)
                return 1
            time.sleep(0.2)

        serving = Serving(settings)
        serving.sync(reg)
        what = (
            f"efficientnet_lite0 {args.image_size}x{args.image_size} PNG"
            if args.image
            else "mlp 64 -> [256, 256] -> 10 on float vectors"
        )
        print(f"predict bench: {what}; cpu, torch threads {torch.get_num_threads()}, {args.seconds:g}s per measurement")
        with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(1) as worker:
            for batch in batches:
                inputs = make_inputs(settings, batch, seed=batch)
                body = json.dumps({"inputs": inputs}).encode()
                decoded = decode_inputs(inputs, settings.model.input, max_image_pixels=10**8)

                def direct(decoded: Any = decoded) -> None:
                    # In a worker thread, as the server runs it: on an oversubscribed machine, OpenMP
                    # in the main thread alone is several times slower, which would flatter HTTP.
                    worker.submit(serving.predict, decoded).result()

                def http(body: bytes = body) -> None:
                    r = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
                    if r.status_code != 200:
                        raise RuntimeError(f"predict answered {r.status_code}: {r.text[:200]}")

                lat_d, lat_h = measure(direct, http, args.seconds)
                # Throughput of each path from its own time share of the interleaved run.
                d50, d99, dthr = summarise(lat_d, batch, sum(lat_d))
                h50, h99, hthr = summarise(lat_h, batch, sum(lat_h))
                print(
                    f"batch {batch:>3}  direct  p50 {d50:8.3f} ms  p99 {d99:8.3f} ms  throughput {dthr:9.1f} samples/s"
                )
                print(
                    f"batch {batch:>3}  http    p50 {h50:8.3f} ms  p99 {h99:8.3f} ms  throughput {hthr:9.1f} samples/s"
                )
                print(
                    f"batch {batch:>3}  overhead ratio http/direct: p50 {h50 / d50:.2f}x, throughput {dthr / hthr:.2f}x"
                )
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
