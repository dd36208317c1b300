"""Benchmark: one MMD drift check (500 permutations, 1280-d embeddings) against the
straightforward implementation that recomputes the kernel for every permutation.

    .venv/bin/python bench/drift.py            # n = 1,000 / 5,000 / 20,000 per window
    .venv/bin/python bench/drift.py --quick    # same sizes, naive timed on fewer permutations

Every case runs in a fresh subprocess so its peak RSS (``ru_maxrss``, which includes
the interpreter, torch and the two input windows) is its own. Wall and CPU seconds are
both printed: on a shared machine the CPU time is the steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from continual.drift import MMDDetector

DIM = 1280
PERMUTATIONS = 500
MEMORY_LIMIT_GB = 4.0


def _windows(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Post-activation-like float32 embeddings; the current window is slightly shifted.
    rng = np.random.default_rng(0)
    ref = np.maximum(rng.standard_normal((n, DIM), dtype=np.float32) + 0.5, 0.0)
    cur = np.maximum(rng.standard_normal((n, DIM), dtype=np.float32) + 0.52, 0.0)
    return ref, cur


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T).clamp_(min=0.0)


def naive_mmd(
    ref: np.ndarray, cur: np.ndarray, permutations: int, budget_s: float = float("inf"), seed: int = 0
) -> tuple[float, int]:
    """The textbook loop: for the observed split and each permutation, rebuild the three
    kernel blocks from the data and average them. Same preprocessing and bandwidth rule.
    Stops early once ``budget_s`` is spent; returns (observed MMD², permutations done)."""
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(np.concatenate([ref, cur]))
    z = (z - z.mean(0)) / z.std(0).clamp(min=1e-12)
    sub = z[torch.as_tensor(rng.choice(len(z), size=min(1000, len(z)), replace=False))]
    h2 = float(_sq_dists(sub, sub)[torch.triu_indices(len(sub), len(sub), 1).unbind()].median())
    n, m = len(ref), len(cur)

    def unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
        kxx, kyy, kxy = (torch.exp(-_sq_dists(a, b) / (2 * h2)) for a, b in ((x, x), (y, y), (x, y)))
        return float((kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - m) / (m * (m - 1)) - 2 * kxy.sum() / (n * m))

    start = time.perf_counter()
    observed = unbiased(z[:n], z[n:])
    done = 0
    while done < permutations and time.perf_counter() - start < budget_s:
        perm = torch.as_tensor(rng.permutation(n + m))
        unbiased(z[perm[:n]], z[perm[n:]])  # only the cost matters here, not the p-value
        done += 1
    return observed, done


def _case(kind: str, n: int, perms: int, budget_s: float) -> None:
    ref, cur = _windows(n)
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == "fast":
        result = MMDDetector(permutations=perms, seed=0).check(ref, cur)
        statistic, done, method = result.statistic, perms, result.details["method"]
    else:
        statistic, done = naive_mmd(ref, cur, perms, budget_s)
        method = "naive"
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(dict(seconds=seconds, cpu=cpu, peak_bytes=peak, statistic=statistic, done=done, method=method)))


def _run(kind: str, n: int, perms: int, budget_s: float = float("inf")) -> dict:
    cmd = [sys.executable, __file__, "--case", kind, "--n", str(n), "--perms", str(perms), "--budget", str(budget_s)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="time the naive loop on fewer permutations")
    parser.add_argument("--case", choices=["fast", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--perms", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        _case(args.case, args.n, args.perms, args.budget)
        return

    # Permutations the naive loop may run per size: all 500 at n=1000 unless that overruns
    # the time budget. Every permutation costs the same, so a partial run extrapolates linearly.
    naive_perms = {1000: 10 if args.quick else PERMUTATIONS, 5000: 2 if args.quick else 5, 20000: 0}
    budget_s = 30.0 if args.quick else 120.0
    print(f"MMD check, {PERMUTATIONS} permutations, {DIM}-d float32 embeddings, {torch.get_num_threads()} threads, cpu")
    per_eval_5000 = None
    for n, k in naive_perms.items():
        fast = _run("fast", n, PERMUTATIONS)
        gb = fast["peak_bytes"] / 1e9
        line = f"mmd n={n}: fast {fast['seconds']:.1f} s ({fast['method']}, cpu {fast['cpu']:.1f} s)"
        if k:
            naive = _run("naive", n, k, budget_s)
            done = naive["done"]
            # The naive loop evaluated the observed split plus `done` permutations.
            per_eval = naive["seconds"] / (done + 1)
            naive_s = per_eval * (PERMUTATIONS + 1)
            naive_cpu = naive["cpu"] / (done + 1) * (PERMUTATIONS + 1)
            how = "measured" if done == PERMUTATIONS else f"extrapolated from {done} perms"
            line += f", naive {naive_s:.1f} s ({how}, cpu {naive_cpu:.1f} s)"
            line += f", speed-up {naive_s / fast['seconds']:.0f}x (cpu {naive_cpu / fast['cpu']:.0f}x)"
            line += f", peak {gb:.2f} GB (naive {naive['peak_bytes'] / 1e9:.2f} GB)"
            line += f", MMD² fast {fast['statistic']:.3e} naive {naive['statistic']:.3e}"
            if n == 5000:
                per_eval_5000 = per_eval
        else:
            line += f", peak {gb:.2f} GB"
            if per_eval_5000 is not None:
                # The naive kernel here would be (2n)² float32 = 6.4 GB, over the budget: estimate
                # from n = 5,000 by the n² cost of one kernel evaluation instead of running it.
                naive_s = per_eval_5000 * (n / 5000) ** 2 * (PERMUTATIONS + 1)
                line += f"; naive not run (its kernel needs {(2 * n) ** 2 * 4 / 1e9:.1f} GB), estimated {naive_s:.0f} s"
                line += f" by n² scaling from n=5000, speed-up ~{naive_s / fast['seconds']:.0f}x"
        line += " [within 4 GB]" if gb <= MEMORY_LIMIT_GB else " [OVER 4 GB]"
        print(line, flush=True)


if __name__ == "__main__":
    main()
