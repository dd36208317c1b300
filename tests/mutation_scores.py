"""Mutation scores per module after ``make mutation`` (run from the repository root; no tests here).

Reads mutmut's result files under ``mutants/`` and prints, for each mutated module (and for
the two functions of interest in the modules that hold more: ``derived_id``, ``split_of``),
mutants killed / survived / without a test, and the score killed / (killed + survived + no
test), shells excluded. A timeout counts as killed (the mutant made the tests hang past a
generous CPU limit: they noticed) and is shown apart. Mutants that no
selected test reached ("no tests") are listed by function: for the pure cores that is a gap,
for the shells around them (``gate.evaluate`` and friends) it is by design, since
``make mutation`` runs only the fast unit tests. Surviving mutants are named, one a line, for
``mutmut show NAME``. Exit status 1 when a pure core scores below ``--target`` (default 85 %).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

# Functions outside the pure cores that the fast unit tests deliberately do not reach.
SHELLS = {
    "continual/gate.py": {"holdouts", "score", "evaluate"},
    "continual/learn/replay.py": {"draw_replay"},
}
# Modules scored by one function only (the rest of the file is ingest or SQL, tested elsewhere).
ONLY = {"continual/ingest/batch.py": "derived_id", "continual/store/samples.py": "split_of"}
KILLED = {"killed", "timeout", "caught by type check"}


def function_of(mutant: str) -> str:
    """``continual.gate.x_decide__mutmut_12`` -> ``decide``; methods: ``xǁClassǁmethod__mutmut_3`` -> ``Class.method``."""
    name = mutant.rsplit(".", 1)[-1]
    name = re.sub(r"__mutmut_\d+$", "", name)
    name = name[2:] if name.startswith("x_") else name
    return name.removeprefix("xǁ").replace("ǁ", ".")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=85.0)
    args = parser.parse_args(argv)
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    untested: dict[str, Counter[str]] = defaultdict(Counter)
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        module = meta.relative_to("mutants").as_posix().removesuffix(".meta")
        exit_codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        for mutant, code in exit_codes.items():
            func = function_of(mutant)
            if module in ONLY and func != ONLY[module]:
                continue
            key = f"{module}:{ONLY[module]}" if module in ONLY else module
            status = status_by_exit_code[code]
            if status == "no tests":
                untested[key][func] += 1
                if func.split(".")[0] in SHELLS.get(module, ()):
                    continue
            rows[key]["killed" if status in KILLED else status] += 1
            if status == "timeout":
                rows[key]["of which timeouts"] += 1
            if status == "survived":
                survivors[key].append(mutant)
    if not rows:
        print("no mutmut results under mutants/: run `make mutation`", file=sys.stderr)
        return 2
    below = []
    print(f"{'module':44} {'killed':>6} {'survived':>8} {'no tests':>8} {'score':>7}")
    for key, c in sorted(rows.items()):
        decided = c["killed"] + c["survived"] + c["no tests"]  # a pure function no test reaches is a gap
        score = 100.0 * c["killed"] / decided if decided else float("nan")
        extra = "".join(f"  {k}: {v}" for k, v in c.items() if k not in {"killed", "survived", "no tests"})
        print(f"{key:44} {c['killed']:6d} {c['survived']:8d} {c['no tests']:8d} {score:6.1f}%{extra}")
        if not score >= args.target:
            below.append(key)
    for key, funcs in sorted(untested.items()):
        shells = SHELLS.get(key, set())
        listed = ", ".join(
            f"{f} ({n}{', shell' if f.split('.')[0] in shells else ''})" for f, n in sorted(funcs.items())
        )
        print(f"no test reached, {key}: {listed}")
    for key, names in sorted(survivors.items()):
        print(f"survived, {key}:")
        for name in names:
            print(f"    {name}")
    if below:
        print(f"below the {args.target:g}% target: {', '.join(below)}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
