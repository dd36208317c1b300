"""The training worker: ``python -m continual.learn.worker --run RUN_ID [--config PATH]``.

Runs one training run in its own process (never in the service): reads the run
spec from the store, trains, writes the candidate through the registry and
records the outcome on the run row. Exit status: 0 succeeded, 1 failed,
143 cancelled (SIGTERM). Under torchrun every rank runs this module; rank 0 owns
the run row and writes the version.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from continual.config import Settings, load_settings, settings_from_dict
from continual.learn import runs
from continual.learn.data import (
    RunData,
    SampleDataset,
    TensorBatches,
    make_loader,
    plan_run_data,
    sequential_batches,
)
from continual.learn.evaluate import resolve_device
from continual.learn.ewc import EwcTerm, combine_fisher, fisher_diagonal
from continual.learn.features import FeatureCache, backbone_hash, embed_samples
from continual.learn.loop import Cancelled, TimeBudgetExceeded, TrainResult, train
from continual.learn.orphan import watch_service
from continual.learn.replay import MixedBatchSampler, uses_ewc
from continual.store import Store

log = logging.getLogger("continual.learn.worker")

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 143


class ClassesChanged(ValueError):
    def __init__(self, parent: str, parent_classes: tuple[str, ...], configured: tuple[str, ...]) -> None:
        self.parent, self.parent_classes, self.configured = parent, parent_classes, configured
        super().__init__(
            f"the parent version {parent} has classes {list(parent_classes)} but [model] classes = "
            f"{list(configured)}; changing the classes needs a new bootstrap model"
        )


# -- several processes (torchrun) --------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )

    def broadcast(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any_true(self, flag: bool) -> bool:
        """Whether any rank says yes: all ranks stop at the same step, or a collective would hang."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def pick_device(settings: Settings, dist: Dist) -> torch.device:
    device = resolve_device(settings.training.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank % max(1, torch.cuda.device_count()))
    return device


def cpu_threads(settings: Settings, dist: Dist) -> int:
    """``cpu_threads``, else all cores but one (serving keeps a core), shared among the local ranks."""
    n = settings.training.cpu_threads or max(1, (os.cpu_count() or 2) - 1)
    return max(1, n // dist.local_world_size)


# -- the run -----------------------------------------------------------------------------
def settings_for_run(base: Settings, spec: dict[str, Any]) -> Settings:
    """The run's settings: its snapshot, with the store (and its secrets) from this process's config."""
    snapshot = dict(spec.get("settings") or {})
    base_dump = base.model_dump(mode="json")
    merged = {**base_dump, **snapshot, "store": base_dump["store"], "auth": base_dump["auth"]}
    return settings_from_dict(merged, source=f"run spec (settings snapshot {sorted(snapshot)})")


class ProgressWriter:
    """Writes progress to the run row at most once per ``interval`` seconds (and on every phase change)."""

    def __init__(self, store: Store, run_id: int, *, enabled: bool, interval: float = 1.0) -> None:
        self.store, self.run_id, self.enabled, self.interval = store, run_id, enabled, interval
        self._last, self._phase = 0.0, ""

    def __call__(self, progress: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        phase = str(progress.get("phase", ""))
        if now - self._last < self.interval and phase == self._phase:
            return
        self._last, self._phase = now, phase
        runs.set_progress(self.store, self.run_id, progress)


def execute_run(
    store: Store,
    base_settings: Settings,
    run_id: int,
    *,
    stop: threading.Event | None = None,
    dist: Dist | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one training run to its end and record it; returns the run's final row (rank 0).

    Raises only when the outcome cannot be recorded; every training failure ends
    up as ``failed`` (or ``cancelled``) on the run row.
    """
    from continual.registry import Registry

    dist = dist or Dist()
    stop = stop or threading.Event()
    started = time.monotonic()
    row = runs.get_run(store, run_id)
    # Rank 0 owns the row (the other ranks may read it after rank 0 started it).
    if dist.is_main and row["status"] != "pending":
        raise runs.RunNotPending(run_id, row["status"])
    spec = row["spec"] or {}
    try:
        settings = settings_for_run(base_settings, spec)
    except Exception as e:
        if dist.is_main:
            runs.start_run(store, run_id, parent=row["parent_version"], data_cutoff=0)
            runs.finish_run(store, run_id, "failed", error=f"bad run spec: {e}")
        return runs.get_run(store, run_id)
    seed = int(spec.get("seed", settings.training.seed))
    registry = Registry(settings.models_dir, store)
    progress_writer = ProgressWriter(store, run_id, enabled=dist.is_main)

    def progress(p: dict[str, Any]) -> None:
        progress_writer(p)
        if on_progress is not None:
            on_progress(p)

    # Rank 0 fixes the data set (parent, cutoffs) and records it before any training.
    fixed: tuple[str | None, int, int] | None = None
    if dist.is_main:
        parent = row["parent_version"] or registry.champion()
        parent_cutoff = registry.manifest(parent).data_cutoff if parent else 0
        data_cutoff = store.max_seq()
        runs.start_run(store, run_id, parent=parent, data_cutoff=data_cutoff)
        fixed = (parent, parent_cutoff, data_cutoff)
    parent, parent_cutoff, data_cutoff = dist.broadcast(fixed)

    deadline = started + settings.training.max_duration_seconds

    def should_stop() -> None:
        local = stop.is_set()
        if dist.any_true(local or time.monotonic() > deadline):
            if local or stop.is_set():
                raise Cancelled()
            raise TimeBudgetExceeded(settings.training.max_duration_seconds)

    local: dict[str, Any] = {"id": run_id, "status": "succeeded", "error": None}
    try:
        outcome = _train_candidate(
            store, registry, settings, run_id,
            parent=parent, parent_cutoff=parent_cutoff, data_cutoff=data_cutoff, seed=seed,
            dist=dist, should_stop=should_stop, progress=progress, trigger=str(spec.get("trigger", "")),
        )  # fmt: skip
        if dist.is_main:
            outcome["metrics"]["duration_seconds"] = round(time.monotonic() - started, 3)
            runs.finish_run(store, run_id, "succeeded", candidate=outcome["version"], metrics=outcome["metrics"])
    except BaseException as e:
        # A DataLoader worker killed by the same SIGTERM surfaces as some other error.
        cancelled = isinstance(e, (Cancelled, KeyboardInterrupt)) or stop.is_set()
        local.update(status="cancelled" if cancelled else "failed", error=_describe_error(e))
        if dist.is_main:
            if cancelled:
                runs.finish_run(store, run_id, "cancelled", error="cancelled: stop requested (SIGTERM)")
            else:
                runs.finish_run(store, run_id, "failed", error=_describe_error(e))
        if not isinstance(e, Exception | Cancelled):
            raise
        if not cancelled:
            log.error("training run %d failed: %s", run_id, _describe_error(e))
            log.debug("%s", traceback.format_exc())
    # Only rank 0 records; the other ranks report their own outcome.
    return runs.get_run(store, run_id) if dist.is_main else local


def _describe_error(e: BaseException) -> str:
    if isinstance(e, TimeBudgetExceeded):
        return str(e)
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory: {e} (lower training.batch_size)"
    return f"{type(e).__name__}: {e}"


def _train_candidate(
    store: Store,
    registry: Any,
    settings: Settings,
    run_id: int,
    *,
    parent: str | None,
    parent_cutoff: int,
    data_cutoff: int,
    seed: int,
    dist: Dist,
    should_stop: Callable[[], None],
    progress: Callable[[dict[str, Any]], None],
    trigger: str,
) -> dict[str, Any]:
    from continual.models import build_model

    t = settings.training
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.set_num_threads(cpu_threads(settings, dist))
    # Tiny gradients and Adam moments underflow to denormals, which x86 CPUs process many times
    # slower; flushing them to zero changes no result that matters and speeds CPU steps up ~15%.
    torch.set_flush_denormal(True)
    device = pick_device(settings, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    progress({"phase": "loading"})
    data_start, data_cpu = time.perf_counter(), time.process_time()
    data = plan_run_data(store, settings, parent_cutoff=parent_cutoff, data_cutoff=data_cutoff, seed=seed)
    # Bootstrap: the pretrained base with a fresh head. Update: a copy of the parent.
    model = registry.load_model(parent, settings) if parent else build_model(settings.model)
    if tuple(model.classes) != tuple(settings.model.classes):
        raise ClassesChanged(parent or "?", tuple(model.classes), tuple(settings.model.classes))
    model.to(device)
    ewc_on = uses_ewc(t.strategy)
    parent_fisher = registry.load_tensors(parent, "fisher") if parent and ewc_on else None
    # The anchor is the parent's weights: the model before its first step.
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    ewc = EwcTerm(model, anchor, parent_fisher) if parent_fisher else None

    net, train_ds, val_ds, cache_info = _datasets(store, settings, model, data, device)
    cache_info["data_seconds"] = round(time.perf_counter() - data_start, 3)
    cache_info["data_cpu_seconds"] = round(time.process_time() - data_cpu, 3)
    sampler = MixedBatchSampler(
        n_new=len(data.new), n_replay=len(data.replay), batch_size=t.batch_size, replay_ratio=t.replay_ratio,
        seed=seed, rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip
    pin = device.type == "cuda"
    loader = make_loader(train_ds, sampler, num_workers=t.num_workers, pin_memory=pin)
    val_loader = (
        make_loader(val_ds, sequential_batches(len(val_ds), 256), num_workers=0) if val_ds is not None else None
    )

    def train_batches(epoch: int) -> Any:
        sampler.set_epoch(epoch)
        return loader

    def wrap(m: nn.Module) -> nn.Module:
        if not dist.enabled:
            return m
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(m, device_ids=ids)

    result = train(
        model, settings, train_batches,
        steps_per_epoch=len(sampler), device=device, net=net,
        val_batches=(lambda: val_loader) if val_loader is not None else None,
        ewc=ewc, wrap=wrap, on_progress=progress, should_stop=should_stop,
    )  # fmt: skip

    fisher: dict[str, torch.Tensor] | None = None
    fisher_n = 0
    if ewc_on:
        progress({"phase": "fisher"})
        fisher_new, fisher_n = _fisher(net, model, train_ds, data, settings, device, dist, seed, should_stop)
        fisher = combine_fisher(parent_fisher, fisher_new, t.fisher_decay)

    metrics = _metrics(result, data, settings, seed=seed, fisher_n=fisher_n, cache_info=cache_info)
    should_stop()  # a SIGTERM before the write: nothing is written (every rank asks: it is a collective)
    if not dist.is_main:
        return {"version": None, "metrics": metrics}
    progress({"phase": "writing"})
    manifest = registry.write_version(
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        architecture=model.architecture,
        classes=model.classes,
        input_spec=settings.model.input.model_dump(mode="json"),
        parent=parent,
        data_cutoff=data_cutoff,
        run_id=run_id,
        metrics=metrics,
        extra_tensors={"fisher": fisher} if fisher else None,
        extra={
            "seed": seed,
            "trigger": trigger,
            "strategy": t.strategy,
            "training": t.model_dump(mode="json"),
            "mode": settings.model.mode,
            "unfreeze_last": settings.model.unfreeze_last,
            "world_size": dist.world_size,
            "data": data.summary(),
        },
    )
    return {"version": manifest.version, "metrics": metrics}


def _datasets(
    store: Store, settings: Settings, model: nn.Module, data: RunData, device: torch.device
) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """(net, train dataset, validation dataset or None, cache info).

    With a frozen base (feature_extraction, no augmentation) and few enough
    samples, the base runs once per sample and the head trains on its cached
    outputs; otherwise batches are decoded from the store every epoch.
    """
    t, m = settings.training, settings.model
    spec = m.input
    n_all = len(data.train) + len(data.validation)
    frozen_base = m.mode == "feature_extraction" and not spec.augment
    if frozen_base and 0 < n_all <= t.feature_cache_items:
        model.eval()
        cache = FeatureCache(
            backbone_hash(model), t.feature_cache_items, settings.service.data_dir / "cache" / "features"
        )
        hits0 = cache.hits
        feats = embed_samples(
            model, np.concatenate([data.train, data.validation]), spec=spec, store=store, cache=cache, device=device
        )
        try:
            cache.save()
        except OSError as e:  # a read-only cache dir only costs speed
            log.warning("could not save the feature cache: %s", e)
        x = torch.from_numpy(feats)
        n_train = len(data.train)
        train_ds = TensorBatches(x[:n_train], torch.as_tensor(data.train_labels))
        val_ds = TensorBatches(x[n_train:], torch.as_tensor(data.validation_labels)) if len(data.validation) else None
        info = {"feature_cache": True, "feature_cache_hits": cache.hits - hits0}
        return model.head, train_ds, val_ds, info
    url = store.url
    train_ds = SampleDataset(
        url, data.train, data.train_labels, spec, train=True, cache_items=t.feature_cache_items, store=store
    )
    val_ds = (
        SampleDataset(
            url, data.validation, data.validation_labels, spec, train=False, cache_items=t.feature_cache_items,
            store=store,
        )
        if len(data.validation)
        else None
    )  # fmt: skip
    # DataLoader worker processes keep their own copies: preloading here would only help epoch 1's fork.
    preloaded = t.num_workers == 0 and train_ds.preload()
    if val_ds is not None and t.num_workers == 0:
        val_ds.preload()
    return model, train_ds, val_ds, {"feature_cache": False, "preloaded": preloaded}


def _fisher(
    net: nn.Module,
    model: nn.Module,
    train_ds: Any,
    data: RunData,
    settings: Settings,
    device: torch.device,
    dist: Dist,
    seed: int,
    should_stop: Callable[[], None],
) -> tuple[dict[str, torch.Tensor], int]:
    """The Fisher on a seeded subset of the run's training data, shared out over the ranks."""
    t = settings.training
    n = len(data.train)
    rng = np.random.default_rng([seed, 7])
    subset = np.sort(rng.permutation(n)[: t.fisher_samples])[dist.rank :: dist.world_size].tolist()
    batches = [subset[i : i + 64] for i in range(0, len(subset), 64)]
    loader = make_loader(train_ds, batches, num_workers=0)
    prefix = "head." if net is not model else ""
    # The base is frozen with cached features: the Fisher covers the head, whose names get the prefix.
    fisher, count = fisher_diagonal(
        net, loader, max_samples=len(subset), device=device, prefix=prefix, should_stop=should_stop
    )
    if dist.enabled:
        total = torch.tensor([float(count)])
        torch.distributed.all_reduce(total)
        for k in sorted(fisher):
            f = fisher[k] * count
            torch.distributed.all_reduce(f)
            fisher[k] = f / total.item()
        count = int(total.item())
    return fisher, count


def _metrics(
    result: TrainResult, data: RunData, settings: Settings, *, seed: int, fisher_n: int, cache_info: dict[str, Any]
) -> dict[str, Any]:
    def num(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else round(float(v), 6)

    return {
        "validation_accuracy": num(result.validation_accuracy),
        "validation_n": result.validation_n,
        **data.summary(),
        "strategy": settings.training.strategy,
        "seed": seed,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "final_loss": num(result.final_loss),
        "samples_seen": result.samples_seen,
        "train_seconds": round(result.train_seconds, 3),
        "train_cpu_seconds": round(result.train_cpu_seconds, 3),
        "samples_per_s": round(result.samples_per_s, 1),
        "fisher_samples": fisher_n,
        "history": result.history,
        **cache_info,
    }


# -- the process ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m continual.learn.worker", description=__doc__)
    # --run-id: the same; torchrun's own parser refuses "--run" as an ambiguous abbreviation of --run-path.
    parser.add_argument("--run", "--run-id", dest="run", type=int, required=True, metavar="RUN_ID")
    parser.add_argument("--config", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()

    def on_sigterm(signum: int, _frame: Any) -> None:
        # Only a flag: the loop checks it every step and stops within one step.
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)

    dist = Dist.from_env()
    base = load_settings(args.config, require_file=args.config is not None)
    store = Store.from_settings(base)

    def orphaned() -> None:
        # The service was killed (-9 does not reach this process group): restart recovery
        # would mark the run interrupted; record that now and stop instead of training on.
        if dist.is_main:
            try:
                runs.finish_run(store, args.run, "interrupted", error="the service that started this run is gone")
            except Exception:
                log.exception("could not mark training run %d interrupted", args.run)
        stop.set()

    watch_service(orphaned)
    if dist.enabled:
        backend = "nccl" if torch.cuda.is_available() and base.training.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    try:
        row = execute_run(store, base, args.run, stop=stop, dist=dist)
        if dist.enabled:
            # Leave together: rank 0 writes the version while the others are done, and a
            # rank tearing down its gloo pairs under a peer still using them aborts (SIGABRT).
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    finally:
        # On an exception the group is left alone: destroying it under peers still in a
        # collective can hang; torchrun stops the other ranks once this one exits non-zero.
        store.dispose()
    status = row["status"]
    if dist.is_main:
        print(f"training run {args.run}: {status}" + (f" ({row['error']})" if row.get("error") else ""), flush=True)
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status, EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
