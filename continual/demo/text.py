"""`make demo-text`: the real service with a text classifier, driven over HTTP through Debian package descriptions.

It starts ``continual serve`` with ``config-text.toml`` (the MiniLM sentence
encoder, frozen, a linear head over cached embeddings), reads this machine's apt
lists (``apt-cache dumpavail``, see ``continual/demo/debian.py``) and feeds package
descriptions labeled by archive section in the same four acts as ``make demo``:

1. applications                 → the first champion is trained (bootstrap);
2. libraries and bindings       → ("library for ...", "Python 3 module ...", "development files"):
                                   drift is detected, a run learns it, the gate promotes;
3. a poisoned batch             → application descriptions with random sections; an operator asks
                                   for a run; the gate rejects it, the operator excludes the batch;
4. data, common and doc packages → ("... (data files)", "documentation for ..."): a further shift.

Then it prints the timeline and writes ``demo-out-text/report.png`` (the machinery: ``continual/demo/show.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from continual.client import text_sample
from continual.demo.debian import CLASSES, NoAptLists, Package, kind_of, packages, stable_order
from continual.demo.show import ROOT, Story, play, run

STORY = Story(
    "continual demo-text",
    "applications",
    "libraries",
    "poison",
    "data",
    (
        "application descriptions -> bootstrap the first champion",
        "libraries and language bindings -> drift -> run -> gate",
        "a poisoned batch (application descriptions, random sections); the operator asks for a run",
        "data, common and documentation packages -> a further shift",
    ),
)


@dataclass
class TextPhase:
    name: str
    ids: list[str]
    texts: list[str]
    labels: list[str]

    def samples(self) -> list[dict[str, Any]]:
        return [text_sample(t, lab, id=i) for i, t, lab in zip(self.ids, self.texts, self.labels, strict=True)]

    def inputs(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [{"text": self.texts[k]} for k in indices]


def _phase(name: str, pkgs: Sequence[Package], labels: Sequence[str] | None = None) -> TextPhase:
    return TextPhase(
        name,
        [p.id if labels is None else f"poison:{p.name}" for p in pkgs],
        [p.text for p in pkgs],
        list(labels) if labels is not None else [p.section for p in pkgs],
    )


def build_phases(n_apps: int, n_support: int, seed: int) -> dict[str, TextPhase]:
    pkgs = packages(CLASSES)
    by_kind: dict[str, list[Package]] = {"app": [], "library": [], "data": []}
    for p in stable_order(pkgs, seed):
        by_kind[kind_of(p.name)].append(p)
    apps = by_kind["app"]
    rng = np.random.default_rng(seed)
    poison = apps[n_apps : n_apps + n_support // 2]
    return {
        "applications": _phase("applications", apps[:n_apps]),
        "libraries": _phase("libraries", by_kind["library"][:n_support]),
        # Inputs like the ones the champion knows, with uniformly random sections.
        "poison": _phase("poison", poison, [CLASSES[i] for i in rng.integers(0, len(CLASSES), len(poison))]),
        "data": _phase("data", by_kind["data"][:n_support]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "config-text.toml"))
    ap.add_argument("--out", default=str(ROOT / "demo-out-text"))
    ap.add_argument("--apps", type=int, default=800, help="application samples (act 1)")
    ap.add_argument("--support", type=int, default=500, help="samples per support phase (acts 2 and 4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        phases = build_phases(args.apps, args.support, args.seed)
    except NoAptLists as e:
        print(f"demo-text needs this machine's apt package lists: {e}", file=sys.stderr)
        return 2
    return play(STORY, phases, config=Path(args.config), out=Path(args.out))


if __name__ == "__main__":
    sys.exit(run(main))
