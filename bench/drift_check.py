"""Benchmark: repeated drift checks (``run_check``) with the demo's model, cached vs uncached.

The demo checks every few seconds with EfficientNet-Lite0 on 96x96 digit PNGs on a
small CPU, so the check's cost is the backbone. This measures, in one run on one
store and one champion (weights "none": the same compute as ImageNet weights):

- cold: the first check (every window sample goes through the backbone);
- warm: a repeat with nothing new (every embedding from the cache);
- +k new: a repeat after k new samples arrived (only those are embedded);
- baseline: the same +k check with an empty cache, i.e. what every check would
  cost without caching; and prints the speed-up ratios against it.

Then the store's size: a warm check (cached embeddings) over a store of 10,000
samples against one of 1,000,000 (64-d vectors, a small MLP champion). The windows
are drawn by probing random seqs, not by reading every old sample, so the two
should cost about the same (target: ratio <= 2).

    .venv/bin/python bench/drift_check.py [--window 500] [--new 20] [--large 1000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from continual.config import settings_from_dict
from continual.demo.digits import digit_images, digit_vectors, png, shift
from continual.drift.check import run_check
from continual.drift.windows import EmbeddingCache
from continual.models import build_model
from continual.registry import Registry
from continual.store import NewSample, Store
from continual.store.engine import EngineOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=500, help="samples per drift window")
    ap.add_argument("--new", type=int, default=20, help="new samples between the repeated checks")
    ap.add_argument("--large", type=int, default=1_000_000, help="store size for the scale check (0: skip it)")
    args = ap.parse_args()
    images, labels = digit_images()
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_from_dict(
            {
                "service": {"data_dir": tmp},
                "model": {
                    "architecture": "efficientnet_lite0",
                    "weights": "imagenet",
                    "classes": [str(i) for i in range(10)],
                    "input": {"kind": "image", "size": [96, 96], "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3},
                },
                "serving": {"device": "cpu"},
                "drift": {"window": args.window, "min_samples": 50, "detectors": ["mmd", "ks", "label"]},
            }
        )
        store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        store.upgrade()
        w, k = args.window, args.new

        def feed(phase: str, start: int, stop: int) -> None:
            imgs = shift(images, phase)
            store.insert([NewSample(f"{phase}-{i}", str(labels[i]), "image", png(imgs[i])) for i in range(start, stop)])

        feed("original", 0, w)
        registry = Registry(settings.models_dir, store)
        torch.manual_seed(0)
        version = registry.import_model(
            build_model(settings.model),
            input_spec=settings.model.input.model_dump(mode="json"),
            data_cutoff=store.max_seq(),
        ).version
        feed("inverted", w, 2 * w)

        cache = EmbeddingCache()

        def check(c: EmbeddingCache) -> tuple[float, int, bool]:
            before = c.computed
            t0 = time.perf_counter()
            d = run_check(settings, store, registry, champion=version, cache=c, record=False)
            return time.perf_counter() - t0, c.computed - before, d.detected

        torch.set_num_threads(torch.get_num_threads())
        print(f"run_check, efficientnet_lite0 96x96 on CPU ({torch.get_num_threads()} threads), window {w}")
        cold, n_cold, det = check(cache)
        print(f"  cold:       {cold:7.2f} s  ({n_cold} embedded, drift={det})")
        warm, n_warm, _ = check(cache)
        print(f"  warm:       {warm:7.2f} s  ({n_warm} embedded)")
        feed("inverted", 2 * w, 2 * w + k)
        inc, n_inc, _ = check(cache)
        print(f"  +{k} new:    {inc:7.2f} s  ({n_inc} embedded)")
        base, n_base, _ = check(EmbeddingCache())
        print(f"  baseline:   {base:7.2f} s  ({n_base} embedded: the same +{k} check, empty cache)")
        print(f"  speed-up vs baseline: warm {base / warm:.1f}x, +{k} new {base / inc:.1f}x")
        store.dispose()
    if args.large:
        scale(args.window, args.large)


def scale(window: int, large: int, small: int = 10_000) -> None:
    """A warm check over ``small`` stored samples vs over ``large``: the windows must not read the whole store."""
    x, y = digit_vectors()
    seconds = {}
    for n in (small, large):
        with tempfile.TemporaryDirectory() as tmp:
            settings = settings_from_dict(
                {
                    "service": {"data_dir": tmp},
                    "model": {"architecture": "mlp", "weights": "none", "mode": "all", "hidden": [32],
                              "input": {"kind": "vector", "shape": [64]}},
                    "serving": {"device": "cpu"},
                    "drift": {"window": window, "min_samples": 50, "detectors": ["mmd", "ks", "label"],
                              "permutations": 100},
                }
            )  # fmt: skip
            store = Store(f"sqlite:///{Path(tmp) / 'scale.db'}", options=EngineOptions(sqlite_synchronous="NORMAL"))
            store.upgrade()
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            for start in range(0, n, 10_000):
                idx = rng.integers(0, len(x), 10_000)
                store.insert([NewSample(f"s{start + i}", str(y[j]), "vector", x[j].tobytes())
                              for i, j in enumerate(idx[: min(10_000, n - start)])])  # fmt: skip
            filled = time.perf_counter() - t0
            registry = Registry(settings.models_dir, store)
            torch.manual_seed(0)
            version = registry.import_model(
                build_model(settings.model),
                input_spec=settings.model.input.model_dump(mode="json"),
                data_cutoff=store.max_seq() - window,
            ).version
            cache = EmbeddingCache()
            run_check(settings, store, registry, champion=version, cache=cache, record=False)  # fills the cache
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                run_check(settings, store, registry, champion=version, cache=cache, record=False)
                times.append(time.perf_counter() - t0)
            seconds[n] = float(np.median(times))
            print(
                f"warm check over {n:>9,} stored samples: {seconds[n] * 1000:7.1f} ms  (store filled in {filled:.0f} s)"
            )
            store.dispose()
    ratio = seconds[large] / seconds[small]
    print(f"ratio {large:,} / {small:,}: {ratio:.2f} (target <= 2) {'OK' if ratio <= 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
