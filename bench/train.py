"""Training throughput: the real path against a plain PyTorch loop, measured in the same run.

    .venv/bin/python bench/train.py [--samples 6000] [--epochs 3] [--batch-size 32]

Real path: a replay+ewc update run through the worker's code (``execute_run``:
store -> DataLoader over seqs -> mixed new/replay batches -> loss + EWC penalty ->
clip -> AdamW step -> progress row), after a bootstrap run that gives it a parent
with a Fisher. Its samples/s counts the training loop only (data loading
included; run setup, validation, the Fisher estimate and the version write are
reported separately). Baseline: a plain loop over tensors already in memory with
the same model, batch size, optimizer, number of samples and step math (EWC
penalty, clipping, schedule); the ratio is what the system adds (target >= 0.8).
A second baseline, the bare cross-entropy loop, shows the strategy's own cost.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from continual.config import Settings, settings_from_dict
from continual.learn.run import create_run, execute_run
from continual.models import build_model
from continual.registry import Registry
from continual.store import NewSample, Store


def data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """load_digits, repeated with small noise up to ``n`` samples."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    reps = -(-n // len(x))
    rng = np.random.default_rng(0)
    xs = np.concatenate([x + rng.normal(0, 0.05, x.shape).astype(np.float32) for _ in range(reps)])[:n]
    return xs, np.tile(y, reps)[:n]


def settings_for(work: Path, epochs: int, batch_size: int, hidden: tuple[int, ...] = (256, 256)) -> Settings:
    return settings_from_dict(
        {
            "service": {"data_dir": str(work)},
            "store": {"url": f"sqlite:///{work / 'store.db'}"},
            "model": {
                "architecture": "mlp",
                "weights": "none",
                "mode": "all",
                "hidden": list(hidden),
                "input": {"kind": "vector", "shape": [64]},
            },
            "training": {
                "strategy": "replay+ewc",
                "epochs": epochs,
                "batch_size": batch_size,
                "learning_rate": 1e-3,
                "head_learning_rate": 1e-3,
                "device": "cpu",
                "replay_buffer": 100_000,
                "early_stopping_patience": epochs + 1,
                "seed": 3,
            },
        }
    )


def plain_loop(
    settings: Settings, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, *, same_step: bool
) -> tuple[float, float]:
    """(samples per wall second, per CPU second) of a plain loop over in-memory tensors.

    ``same_step``: the textbook loop doing the update step's own math — loss plus the
    EWC penalty lam/2 * sum F (theta - theta*)^2 written out and backpropagated,
    gradient clipping, AdamW, a cosine schedule — so the ratio measures what the
    real path adds (store, DataLoader, replay mixing, bookkeeping). Without it: the
    bare cross-entropy loop, so the ratio also counts the strategy's own cost.
    """
    torch.manual_seed(0)
    model = build_model(settings.model)
    model.train()
    t = settings.training
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    fisher = [torch.rand_like(p) for p in params]
    seen = 0
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if same_step:
                penalty = sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchor, fisher, strict=True))
                loss = loss + t.ewc_lambda / 2 * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if same_step:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            if same_step:
                sched.step()
            seen += len(idx)
    return seen / (time.perf_counter() - start), seen / (time.process_time() - cpu)


def run_once(store: Store, settings: Settings) -> dict:
    row = execute_run(
        store,
        settings.resolved_store(),
        create_run(store, settings, trigger="bench"),
        open_files=lambda s: Registry(s.models_dir, store),
    )
    if row["status"] != "succeeded":
        raise RuntimeError(f"run {row['id']} {row['status']}: {row['error']}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6000, help="samples per phase (two phases)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both loops")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of each loop")
    parser.add_argument("--hidden", default="256,256", help="hidden layer widths of the mlp")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="continual-bench-train-") as tmp:
        work = Path(tmp)
        hidden = tuple(int(h) for h in args.hidden.split(","))
        settings = settings_for(work, args.epochs, args.batch_size, hidden)
        settings = settings.model_copy(
            update={"training": settings.training.model_copy(update={"cpu_threads": args.threads})}
        )
        torch.set_num_threads(args.threads)
        store = Store.from_settings(settings)
        store.upgrade()
        registry = Registry(settings.models_dir, store)
        x, y = data(2 * args.samples)
        for phase in range(2):
            lo, hi = phase * args.samples, (phase + 1) * args.samples
            batch = [
                NewSample(f"p{phase}-{i}", str(int(y[i])), "vector", x[i].astype("<f4").tobytes())
                for i in range(lo, hi)
            ]
            for i in range(0, len(batch), 1000):
                store.insert(batch[i : i + 1000])
            if phase == 0:
                bootstrap = run_once(store, settings)
                registry.promote(
                    bootstrap["candidate_version"],
                    expected=registry.store.versions.champion_version(),
                    reason="manual",
                    actor="bench",
                )
        # This machine is shared: alternate the two loops and keep each one's best round.
        reals, plains, reals_wall, plains_wall, bare = [], [], [], [], []
        for _ in range(args.rounds):
            row = run_once(store, settings)  # an update relative to the bootstrap champion, never promoted
            m = row["metrics"]
            # Reading and decoding the run's data counts against the real path.
            reals.append(m["samples_seen"] / (m["train_cpu_seconds"] + m["data_cpu_seconds"]))
            reals_wall.append(m["samples_seen"] / (m["train_seconds"] + m["data_seconds"]))
            per_epoch = m["samples_seen"] // max(1, m["epochs_run"])
            xs = torch.from_numpy(x[:per_epoch].copy())
            ys = torch.from_numpy(y[:per_epoch].astype(np.int64))
            wall, cpu = plain_loop(settings, xs, ys, m["epochs_run"], args.batch_size, same_step=True)
            plains.append(cpu)
            plains_wall.append(wall)
            bare.append(plain_loop(settings, xs, ys, m["epochs_run"], args.batch_size, same_step=False)[1])
        store.dispose()
    # Best round of each; CPU seconds of this (single-threaded) process: on a shared machine wall
    # time mostly measures the other tenants.
    real, plain = max(reals), max(plains)
    real_wall, plain_wall = max(reals_wall), max(plains_wall)
    n_train = m["new_samples"] + m["replay_samples"]
    print(
        f"model mlp {'-'.join(str(d) for d in (64, *hidden, 10))}, batch {args.batch_size}, {m['epochs_run']} epochs, {args.threads} thread(s); "
        f"update run: {m['new_samples']} new + {m['replay_samples']} replay samples ({n_train} in the buffer), "
        f"{m['samples_seen']} samples through the loop"
    )
    print(
        f"real path (store -> DataLoader -> replay+EWC step): {real:8.0f} samples per CPU second (data loading included)"
    )
    print(f"plain PyTorch loop, same step (EWC, clip, schedule): {plain:8.0f} samples per CPU second")
    print(f"bare PyTorch loop (cross-entropy only):             {max(bare):8.0f} samples per CPU second")
    print(f"rounds (real, plain): {', '.join(f'({r:.0f}, {p:.0f})' for r, p in zip(reals, plains, strict=True))}")
    print(f"ratio real/plain: {real / plain:.2f} (target >= 0.8)")
    print(f"ratio real/bare:  {real / max(bare):.2f} (what replay+EWC and the system cost together)")
    print(
        f"wall clock, best rounds: real {real_wall:.0f}/s, plain {plain_wall:.0f}/s, ratio {real_wall / plain_wall:.2f}"
    )
    print(
        f"last update run: data {m['data_seconds']:.2f} s (read + decode), training loop {m['train_seconds']:.2f} s, "
        f"Fisher on {m['fisher_samples']} samples, {m['duration_seconds']:.1f} s in all"
    )
    return 0 if real / plain >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
