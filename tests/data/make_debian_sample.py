"""Writes tests/data/debian_sample.jsonl: a small, fixed slice of the Debian description stream for unit tests.

    .venv/bin/python tests/data/make_debian_sample.py

It reads this machine's apt lists (``apt-cache dumpavail``) through
``continual.demo.debian``, keeps ``APPS`` application packages and up to
``SUPPORT`` support packages per section (a stable, seeded choice by name), and
writes one ``{"text", "label", "id", "phase"}`` object per line, phase "apps"
first. The benchmarks and ``make demo-text`` build the full set at run time
instead; this file only lets the tests run where apt lists are absent.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from continual.demo.debian import CLASSES, packages, stable_order

APPS, SUPPORT = 30, 25
OUT = Path(__file__).resolve().parent / "debian_sample.jsonl"


def main() -> None:
    pkgs = packages()
    lines = []
    for support, per_class in ((False, APPS), (True, SUPPORT)):
        taken: Counter[str] = Counter()
        for p in stable_order([p for p in pkgs if p.support == support], seed=13):
            if taken[p.section] < per_class:
                taken[p.section] += 1
                phase = "support" if support else "apps"
                lines.append({"text": p.text, "label": p.section, "id": p.id, "phase": phase})
    lines.sort(key=lambda d: (d["phase"] != "apps", CLASSES.index(d["label"]), d["id"]))
    OUT.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in lines), encoding="utf-8")
    print(f"wrote {len(lines)} rows to {OUT}")


if __name__ == "__main__":
    main()
