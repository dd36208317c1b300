"""`make demo`: the real service, driven over HTTP through a drifting stream of real handwriting.

It starts ``continual serve`` (embedded SQLite, the ImageNet-pretrained
EfficientNet-Lite0 backbone from ``config.toml``), then feeds scikit-learn's
handwritten digits as PNG images in four acts:

1. original digits        → the first champion is trained (bootstrap);
2. inverted strokes       → drift is detected, a run learns it, the gate promotes;
3. a poisoned batch       → random labels; an operator asks for a run; the gate rejects it,
                             and the operator takes the batch out of play;
4. transposed digits      → a further shift, detected and learned.

Then it prints a timeline and writes ``demo-out/report.png`` (the machinery: ``continual/demo/show.py``;
the text story on Debian package descriptions: ``python -m continual.demo.text``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from continual.client import image_sample
from continual.demo.digits import PHASES, digit_images, png, shift
from continual.demo.show import ROOT, Story, play, run

STORY = Story(
    "continual demo",
    "original",
    "inverted",
    "poison",
    "transposed",
    (
        "original digits -> bootstrap the first champion",
        "inverted strokes -> drift -> run -> gate",
        "a poisoned batch (random labels); the operator asks for a run",
        "transposed digits -> a further shift",
    ),
)


@dataclass
class Phase:
    name: str
    ids: list[str]
    images: list[bytes]
    labels: list[str]

    def samples(self) -> list[dict[str, Any]]:
        return [image_sample(img, lab, id=i) for i, img, lab in zip(self.ids, self.images, self.labels, strict=True)]

    def inputs(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [{"image": image_sample(self.images[k], "x")["image"]} for k in indices]


def build_phases(n: int, seed: int) -> dict[str, Phase]:
    images, y = digit_images()
    rng = np.random.default_rng(seed)
    out: dict[str, Phase] = {}
    for k, name in enumerate(PHASES):
        idx = rng.permutation(len(y))[:n]
        shifted = shift(images[idx], name)
        out[name] = Phase(name, [f"{name}-{i}" for i in idx], [png(im) for im in shifted], [str(v) for v in y[idx]])
        del k
    # Poison: inputs the champion knows (inverted digits) with uniformly random labels.
    idx = rng.permutation(len(y))[: n // 2]
    out["poison"] = Phase(
        "poison",
        [f"poison-{i}" for i in idx],
        [png(im) for im in shift(images[idx], "inverted")],
        [str(v) for v in rng.integers(0, 10, len(idx))],
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "config.toml"))
    ap.add_argument("--out", default=str(ROOT / "demo-out"))
    ap.add_argument("--samples", type=int, default=600, help="samples per phase")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return play(STORY, build_phases(args.samples, args.seed), config=Path(args.config), out=Path(args.out))


if __name__ == "__main__":
    sys.exit(run(main))
