"""Benchmark: repeated drift checks (``run_check``) with the demo's model, cached vs uncached.

The demo checks every few seconds with EfficientNet-Lite0 on 96x96 digit PNGs on a
small CPU, so the check's cost is the backbone. This measures, in one run on one
store and one champion (weights "none": the same compute as ImageNet weights):

- cold: the first check (every window sample goes through the backbone);
- warm: a repeat with nothing new (every embedding from the cache);
- +k new: a repeat after k new samples arrived (only those are embedded);
- baseline: the same +k check with an empty cache, i.e. what every check would
  cost without caching; and prints the speed-up ratios against it.

    .venv/bin/python bench/drift_check.py [--window 500] [--new 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from continual.config import settings_from_dict
from continual.demo.digits import digit_images, png, shift
from continual.drift.check import run_check
from continual.drift.windows import EmbeddingCache
from continual.metrics import Metrics
from continual.models import build_model
from continual.registry import Registry
from continual.store import NewSample, Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=500, help="samples per drift window")
    ap.add_argument("--new", type=int, default=20, help="new samples between the repeated checks")
    args = ap.parse_args()
    images, labels = digit_images()
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_from_dict(
            {
                "service": {"data_dir": tmp},
                "model": {
                    "architecture": "efficientnet_lite0",
                    "weights": "none",
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
        version = registry.write_version(
            build_model(settings.model).state_dict(),
            architecture="efficientnet_lite0",
            classes=settings.model.classes,
            input_spec=settings.model.input.model_dump(mode="json"),
            parent=None,
            data_cutoff=store.max_seq(),
        ).version
        registry.promote(version, expected=registry.store.versions.champion_version(), reason="import")
        feed("inverted", w, 2 * w)

        cache = EmbeddingCache()

        def check(c: EmbeddingCache) -> tuple[float, int, bool]:
            before = c.computed
            t0 = time.perf_counter()
            d = run_check(settings, store, registry, Metrics(), champion=version, cache=c, record=False)
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


if __name__ == "__main__":
    main()
