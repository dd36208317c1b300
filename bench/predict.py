"""Predict latency and throughput through HTTP vs the same model called directly, in the same run,
and with the prediction log on (the default) vs off.

Two real ``continual serve`` children on loopback ports serve the same champion, one
logging every prediction (``[serving] log_predictions = true``, ``log_inputs = "all"``)
and one not; the baseline is ``Serving.predict`` on already-decoded inputs in this
process, with the same weights, run in a worker thread like the server's. Sequential
single-client calls, the three paths in alternating blocks so all see the same machine
load; the ratio of the p50 latencies is the cost of HTTP, JSON, input decoding and the
thread hop, and the throughput ratio log on / log off the cost of the log (target
>= 0.8). Default model: an MLP on 64-d vectors; ``--image`` uses EfficientNet-Lite0
(ImageNet weights) on small PNG images.

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


def config(data_dir: Path, image: bool, image_size: int, log: bool = True) -> dict[str, Any]:
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
            "mode": "all",
            "hidden": [256, 256],
            "input": {"kind": "vector", "shape": [64]},
        }
    )
    model["classes"] = [str(i) for i in range(10)]
    return {
        "service": {"host": "127.0.0.1", "data_dir": str(data_dir), "log_level": "warning"},
        "auth": {"enabled": False},
        "model": model,
        "serving": {"device": "cpu", "max_batch": 64, "log_predictions": log, "log_inputs": "all"},
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


def measure(paths: list[Any], seconds: float, block: float = 0.5, warmup: int = 10) -> list[list[float]]:
    """Alternate half-second blocks of each path, so all see the same machine load (the team
    shares two cores) without one path's idle gaps landing inside another's timings."""
    for _ in range(warmup):
        for call in paths:
            call()
    lat: list[list[float]] = [[] for _ in paths]
    start = time.perf_counter()
    turn = 0
    while time.perf_counter() - start < seconds:
        call = paths[turn]
        block_end = time.perf_counter() + block
        while time.perf_counter() < block_end:
            t = time.perf_counter()
            call()
            lat[turn].append(time.perf_counter() - t)
        turn = (turn + 1) % len(paths)
    return lat


def start_server(tmp: Path, cfg: dict[str, Any], settings: Settings, state: dict[str, Any]) -> tuple[Any, str, Any]:
    """A ``continual serve`` child over its own store with ``state`` as its champion; (process, url, log file)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    store = Store.from_settings(settings_from_dict(cfg))
    store.upgrade()
    reg = Registry(settings_from_dict(cfg).models_dir, store)
    m = reg.write_version(
        state,
        architecture=settings.model.architecture,
        classes=settings.model.classes,
        input_spec=settings.model.input.model_dump(mode="json"),
        parent=None,
        data_cutoff=0,
    )
    reg.promote(m.version, expected=None, reason="import", actor="bench")
    store.dispose()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
    env.update({"CONTINUAL_CONFIG": str(tmp / "config.toml"), "CONTINUAL_SERVICE__PORT": str(port)})
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "continual.cli", "serve"], env=env, stdout=log, stderr=log)
    return proc, f"http://127.0.0.1:{port}", log


def wait_ready(proc: Any, url: str, log_path: Path) -> bool:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            print(log_path.read_text(), file=sys.stderr)
            return False
        time.sleep(0.2)


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
    torch.manual_seed(0)
    state = build_model(settings.model).state_dict()
    servers = {
        "on": start_server(
            tmp / "log-on", config(tmp / "log-on" / "data", args.image, args.image_size), settings, state
        ),
        "off": start_server(
            tmp / "log-off", config(tmp / "log-off" / "data", args.image, args.image_size, log=False), settings, state
        ),
    }
    store = Store.from_settings(settings_from_dict(config(tmp / "log-on" / "data", args.image, args.image_size)))
    try:
        for name, (proc, url, _) in servers.items():
            if not wait_ready(proc, url, tmp / f"log-{name}" / "server.log"):
                return 1
        reg = Registry(
            settings_from_dict(config(tmp / "log-on" / "data", args.image, args.image_size)).models_dir, store
        )
        serving = Serving(settings)
        serving.sync(reg)
        what = (
            f"efficientnet_lite0 {args.image_size}x{args.image_size} PNG"
            if args.image
            else "mlp 64 -> [256, 256] -> 10 on float vectors"
        )
        print(f"predict bench: {what}; cpu, torch threads {torch.get_num_threads()}, {args.seconds:g}s per measurement")
        with (
            httpx.Client(base_url=servers["on"][1], timeout=60) as on,
            httpx.Client(base_url=servers["off"][1], timeout=60) as off,
            ThreadPoolExecutor(1) as worker,
        ):
            ok = True
            for batch in batches:
                inputs = make_inputs(settings, batch, seed=batch)
                body = json.dumps({"inputs": inputs}).encode()
                decoded = decode_inputs(inputs, settings.model.input, max_image_pixels=10**8)

                def direct(decoded: Any = decoded) -> None:
                    # In a worker thread, as the server runs it: on an oversubscribed machine, OpenMP
                    # in the main thread alone is several times slower, which would flatter HTTP.
                    worker.submit(serving.predict, decoded).result()

                def http(client: httpx.Client, body: bytes = body) -> None:
                    r = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
                    if r.status_code != 200:
                        raise RuntimeError(f"predict answered {r.status_code}: {r.text[:200]}")

                lat_d, lat_on, lat_off = measure([direct, lambda: http(on), lambda: http(off)], args.seconds)
                # Throughput of each path from its own time share of the interleaved run.
                d50, d99, dthr = summarise(lat_d, batch, sum(lat_d))
                h50, h99, hthr = summarise(lat_on, batch, sum(lat_on))
                o50, o99, othr = summarise(lat_off, batch, sum(lat_off))
                for name, (p50, p99, thr) in (
                    ("direct", (d50, d99, dthr)),
                    ("http", (h50, h99, hthr)),
                    ("http, log off", (o50, o99, othr)),
                ):
                    print(
                        f"batch {batch:>3}  {name:<13} p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  "
                        f"throughput {thr:9.1f} samples/s"
                    )
                print(
                    f"batch {batch:>3}  overhead ratio http/direct: p50 {h50 / d50:.2f}x, throughput {dthr / hthr:.2f}x"
                )
                ratio = hthr / othr
                ok &= ratio >= 0.8
                print(
                    f"batch {batch:>3}  prediction log: throughput log on / log off {ratio:.2f} (target >= 0.80) "
                    f"{'OK' if ratio >= 0.8 else 'MISSED'}"
                )
        logged = store.predictions.count()
        print(f"prediction log: {logged} predictions logged by the log-on server")
    finally:
        for proc, _, log in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        store.dispose()
    print(f"prediction log cost: {'OK' if ok else 'MISSED'} (log on / log off throughput >= 0.80 at every batch size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
