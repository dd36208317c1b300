"""Build one candidate: the parent (or a fresh pretrained model), the run's data, the loop, the Fisher, the files.

Called by :func:`continual.learn.run.execute_run` in the worker process. Rank 0
writes the version; under torchrun every rank trains its share of each batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from continual.config import Settings
from continual.learn.data import (
    RunData,
    SampleDataset,
    TensorBatches,
    make_loader,
    plan_run_data,
    sequential_batches,
)
from continual.learn.dist import Dist, cpu_threads, pick_device
from continual.learn.ewc import EwcTerm, combine_fisher, fisher_diagonal
from continual.learn.replay import MixedBatchSampler, uses_ewc
from continual.learn.train import TrainResult, train
from continual.models import Classifier, build_model
from continual.models.features import FeatureCache, backbone_hash, embed_rows
from continual.models.manifest import Manifest, ModelSource
from continual.store import Store

log = logging.getLogger("continual.learn.candidate")


class VersionFiles(ModelSource, Protocol):
    """Read and write model versions (``continual.registry.Registry`` implements it)."""

    def write_version(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        architecture: str,
        classes: Sequence[str],
        input_spec: Mapping[str, Any],
        parent: str | None,
        data_cutoff: int,
        run_id: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest: ...


class ClassesChanged(ValueError):
    def __init__(self, parent: str, parent_classes: tuple[str, ...], configured: tuple[str, ...]) -> None:
        self.parent, self.parent_classes, self.configured = parent, parent_classes, configured
        super().__init__(
            f"the parent version {parent} has classes {list(parent_classes)} but [model] classes = "
            f"{list(configured)}; changing the classes needs a new bootstrap model"
        )


@dataclass(frozen=True)
class Candidate:
    version: str | None  # None on ranks other than 0: they write nothing
    metrics: dict[str, Any]


def build_candidate(
    store: Store,
    files: VersionFiles,
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
) -> Candidate:
    """Train a candidate on the run's data and write it (rank 0); raises on any failure."""
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
    model = files.load_model(parent, settings) if parent else build_model(settings.model)
    if tuple(model.classes) != tuple(settings.model.classes):
        raise ClassesChanged(parent or "?", tuple(model.classes), tuple(settings.model.classes))
    model.to(device)
    ewc_on = uses_ewc(t.strategy)
    parent_fisher = files.load_tensors(parent, "fisher") if parent and ewc_on else None
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

    def train_batches(epoch: int) -> Any:  # Any: the DataLoader's batches
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
        return Candidate(None, metrics)
    progress({"phase": "writing"})
    manifest = files.write_version(
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
    return Candidate(manifest.version, metrics)


TrainSet = Dataset[tuple[torch.Tensor, torch.Tensor]]


def _datasets(
    store: Store, settings: Settings, model: Classifier, data: RunData, device: torch.device
) -> tuple[nn.Module, TrainSet, TrainSet | None, dict[str, Any]]:
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
        seqs = np.concatenate([data.train, data.validation])
        by_seq = {r.seq: r for r in store.get_samples(seqs.tolist())}
        missing = [int(s) for s in seqs if int(s) not in by_seq]
        if missing:
            raise KeyError(f"samples left the store during the run: seqs {missing[:10]}")
        feats = embed_rows(model, [by_seq[int(s)] for s in seqs], spec=spec, cache=cache, device=device)
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
    train_ds: TrainSet,
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
