"""Build one candidate: the parent (or a fresh pretrained model), the run's data, the loop, the Fisher, the files.

Called by :func:`continual.learn.run.execute_run` in the worker process. Rank 0
writes the version; under torchrun every rank trains its share of each batch.
When the run's data holds classes the parent lacks (``continual.learn.classes``),
the candidate is the parent with its head grown to them, and the parent is the
teacher of the loop's distillation term.

One piece (about 430 lines): the build is one sequence (parent, data, loop,
Fisher, calibration, files) whose steps share the run's state; split, each part
would take and return most of it.
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
from continual.learn.calibrate import calibrate
from continual.learn.classes import plan_classes
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
from continual.learn.replay import MixedBatchSampler, balanced_replay_ratio, uses_ewc
from continual.learn.target import prepare_adaptation
from continual.learn.train import TrainResult, accuracy_on, train
from continual.models import Classifier, build_model
from continual.models.features import FeatureCache, backbone_hash, embed_rows
from continual.models.heads import grow_classifier, grow_head_tensors
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
    parent_model = files.load_model(parent, settings) if parent else None
    progress({"phase": "planning"})
    # Rank 0 fixes the class list (the store may gain samples while the ranks read it).
    plan = dist.broadcast(
        plan_classes(
            parent, parent_model.classes if parent_model else None, store.classes.rows(settings.model.classes), settings
        )
        if dist.is_main
        else None
    )
    data = plan_run_data(
        store, settings, parent_cutoff=parent_cutoff, data_cutoff=data_cutoff, seed=seed,
        classes=plan.classes, added=plan.added,
    )  # fmt: skip
    # Bootstrap: the pretrained base with a fresh head over the configured (and ready new) classes.
    model = parent_model or build_model(settings.model.model_copy(update={"classes": plan.classes}))
    model.to(device)
    # Logged inputs as unlabeled target data ([training] adaptation); AdaBN re-estimates BatchNorm here.
    progress({"phase": "adapting"})
    adapt = prepare_adaptation(store, settings, model, device, seed=seed, distributed=dist.enabled)
    cache = _feature_cache(settings, model, data)
    teacher: Classifier | None = None
    growth: dict[str, Any] = {}
    if parent_model is not None and plan.added:
        # A copy with the grown head trains; the parent stays as it is, the distillation term's teacher.
        model, growth = _grow(store, settings, parent_model, plan.classes, data, cache, device, seed)
        teacher = parent_model.eval()
        model.to(device)
    ewc_on = uses_ewc(t.strategy)
    parent_fisher = files.load_tensors(parent, "fisher") if parent and ewc_on else None
    if parent_fisher and plan.added:
        # The old head rows keep their Fisher; the new rows have none (nothing to hold them to yet).
        parent_fisher = grow_head_tensors(parent_fisher, len(plan.classes))
    # The anchor is the parent's weights: the model before its first step.
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    ewc = EwcTerm(model, anchor, parent_fisher) if parent_fisher else None

    net, train_ds, val_ds, cache_info = _datasets(store, settings, model, data, device, cache, progress)
    cache_info["data_seconds"] = round(time.perf_counter() - data_start, 3)
    cache_info["data_cpu_seconds"] = round(time.process_time() - data_cpu, 3)
    replay_ratio = t.replay_ratio
    if parent_model is not None and plan.added and t.class_balanced_batches:
        # Each class the same share of a batch: new classes would otherwise pull harder on the shared
        # features than each old one, and the old classes that resemble them lose their samples to them.
        replay_ratio = balanced_replay_ratio(len(plan.base), len(plan.classes))
    sampler = MixedBatchSampler(
        n_new=len(data.new), n_replay=len(data.replay), batch_size=t.batch_size, replay_ratio=replay_ratio,
        seed=seed, rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip
    pin = device.type == "cuda"
    loader = make_loader(train_ds, sampler, num_workers=t.num_workers, pin_memory=pin)
    val_loader = (
        make_loader(val_ds, sequential_batches(len(val_ds), 256), num_workers=0) if val_ds is not None else None
    )

    if growth and val_loader is not None:
        # What the new rows' initialisation gives before any step (imprint vs random, see bench/classes.py).
        growth["validation_accuracy_before_training"] = round(accuracy_on(net, val_loader, device)[0], 6)

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
        # The teacher takes what the net takes: cached features go through the parent's head alone.
        teacher=(teacher.head if net is not model else teacher) if teacher is not None else None,
        n_old=len(plan.base), domain_net=adapt.domain_net, target_batches=adapt.batches,
    )  # fmt: skip
    if result.bias_correction is not None:
        growth["bias_correction"] = result.bias_correction
        if net is not model:
            net = model.head  # the corrected head: the Fisher is the served model's

    fisher: dict[str, torch.Tensor] | None = None
    fisher_n = 0
    if ewc_on:
        progress({"phase": "fisher"})
        fisher_new, fisher_n = _fisher(net, model, train_ds, data, settings, device, dist, seed, should_stop)
        fisher = combine_fisher(parent_fisher, fisher_new, t.fisher_decay)

    metrics = _metrics(result, data, settings, seed=seed, fisher_n=fisher_n, cache_info=cache_info)
    metrics["classes"] = {"added": list(plan.added), "waiting": list(plan.waiting), **growth}
    metrics["replay_ratio"] = round(sampler.replay_ratio, 6)
    metrics["adaptation"] = adapt.info
    should_stop()  # a SIGTERM before the write: nothing is written (every rank asks: it is a collective)
    if not dist.is_main:
        return Candidate(None, metrics)
    calibration, typicality = None, None
    if settings.accuracy.calibrate:
        # Served confidences use this temperature once the version is champion (see continual.learn.calibrate).
        progress({"phase": "calibrating"})
        calibration, typicality = calibrate(model, store, settings, device, upto=data_cutoff, seed=seed)
        metrics["temperature"] = calibration["temperature"]
    extra_tensors = {"fisher": fisher} if fisher else {}
    if typicality is not None:
        extra_tensors["typicality"] = typicality.tensors()
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
        extra_tensors=extra_tensors or None,
        extra={
            "seed": seed,
            "trigger": trigger,
            "strategy": t.strategy,
            "training": t.model_dump(mode="json"),
            "mode": settings.model.mode,
            "unfreeze_last": settings.model.unfreeze_last,
            "adaptation": adapt.info,
            "unfreeze_schedule": t.unfreeze_schedule,
            "world_size": dist.world_size,
            "data": data.summary(),
            **({"calibration": calibration} if calibration is not None else {}),
            "parent_classes": list(plan.base) if parent else None,
            "added_classes": list(plan.added),
        },
    )
    return Candidate(manifest.version, metrics)


TrainSet = Dataset[tuple[torch.Tensor, torch.Tensor]]
# Imprinting a new class's head row needs its mean embedding (and the old classes'): this many samples each.
IMPRINT_SAMPLES = 100


def _feature_cache(settings: Settings, model: Classifier, data: RunData) -> FeatureCache | None:
    """The frozen base's feature cache when the head will train on cached features (see :func:`_datasets`)."""
    t, m = settings.training, settings.model
    n_all = len(data.train) + len(data.validation)
    if m.mode != "feature_extraction" or m.input.augment or not 0 < n_all <= t.feature_cache_items:
        return None
    return FeatureCache(backbone_hash(model), t.feature_cache_items, settings.service.data_dir / "cache" / "features")


def _grow(
    store: Store,
    settings: Settings,
    parent: Classifier,
    classes: tuple[str, ...],
    data: RunData,
    cache: FeatureCache | None,
    device: torch.device,
    seed: int,
) -> tuple[Classifier, dict[str, Any]]:
    """A copy of ``parent`` with its head grown to ``classes`` (old rows exact), and what was done.

    The new rows are imprinted (``[training] head_init``, see
    :func:`continual.models.heads.grow_head` for why centred imprinting): the
    parent embeds up to :data:`IMPRINT_SAMPLES` training samples of every class
    in the run's data. Without samples of an old class to centre on (naive
    strategy, no old-class feedback) or of a new one, the rows start random.
    """
    init = settings.training.head_init
    info: dict[str, Any] = {"head_init": init}
    embeddings: dict[str, torch.Tensor] = {}
    if init == "imprint":
        rng = np.random.default_rng([seed, 11])
        picked = {
            classes[int(k)]: data.train[rng.permutation(np.flatnonzero(data.train_labels == k))[:IMPRINT_SAMPLES]]
            for k in np.unique(data.train_labels)
        }
        rows = {r.seq: r for r in store.get_samples(np.concatenate(list(picked.values())).tolist())}
        parent.eval()
        for c, seqs in picked.items():
            found = [rows[int(s)] for s in seqs if int(s) in rows]
            if found:
                e = embed_rows(parent, found, spec=settings.model.input, cache=cache, device=device)
                embeddings[c] = torch.from_numpy(e)
        added = classes[len(parent.classes) :]
        missing = [c for c in added if c not in embeddings]
        old = [c for c in embeddings if c in set(parent.classes)]
        if missing or not old:
            why = f"no training samples of {missing}" if missing else "no old-class samples to centre on"
            init, info = "random", {"head_init": "random", "imprint_skipped": why}
        else:
            info["imprint_samples"] = {c: len(e) for c, e in embeddings.items()}
    grown = grow_classifier(parent, classes, init=init, embeddings_by_class=embeddings or None, seed=seed)
    return grown, info


def _datasets(
    store: Store,
    settings: Settings,
    model: Classifier,
    data: RunData,
    device: torch.device,
    cache: FeatureCache | None,
    progress: Callable[[dict[str, Any]], None],
) -> tuple[nn.Module, TrainSet, TrainSet | None, dict[str, Any]]:
    """(net, train dataset, validation dataset or None, cache info).

    With a frozen base (feature_extraction, no augmentation) and few enough
    samples (``cache`` is given), the base runs once per sample and the head
    trains on its cached outputs; otherwise batches are decoded from the store
    every epoch.
    """
    t, m = settings.training, settings.model
    spec = m.input
    n_all = len(data.train) + len(data.validation)
    if cache is not None:
        progress({"phase": "embedding", "samples": n_all})
        model.eval()
        hits0 = cache.hits
        seqs = np.concatenate([data.train, data.validation])
        by_seq = {r.seq: r for r in store.get_samples(seqs.tolist())}
        missing = [int(s) for s in seqs if int(s) not in by_seq]
        if missing:
            raise KeyError(f"samples left the store during the run: seqs {missing[:10]}")
        feats = embed_rows(
            model,
            [by_seq[int(s)] for s in seqs],
            spec=spec,
            cache=cache,
            device=device,
            max_pixels=settings.ingest.max_image_pixels,
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
    max_pixels = settings.ingest.max_image_pixels
    train_ds = SampleDataset(
        url,
        data.train,
        data.train_labels,
        spec,
        train=True,
        cache_items=t.feature_cache_items,
        store=store,
        max_pixels=max_pixels,
    )
    val_ds = (
        SampleDataset(
            url, data.validation, data.validation_labels, spec, train=False, cache_items=t.feature_cache_items,
            store=store, max_pixels=max_pixels,
        )
        if len(data.validation)
        else None
    )  # fmt: skip
    # DataLoader worker processes keep their own copies: preloading here would only help epoch 1's fork.
    progress({"phase": "preloading", "samples": n_all})
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
