"""Learning from unlabeled traffic, through the engine: domain adaptation and the label queue on shifted inputs.

    PYTHONPATH=. .venv/bin/python bench/adapt.py [--shifts inverted,transposed] [--seeds 0,...,9]
        [--target-seeds 3,4,5] [--size 48] [--no-images] [--no-text]

Inputs: the digits (``continual.demo.digits``) as PNGs, embedded once by the frozen
ImageNet EfficientNet-Lite0 at ``--size`` px (small, so it runs on two CPU cores),
then served and trained as 1280-d vectors by an MLP (hidden [128, 64], the MLP's
layers are the "backbone" DANN and progressive unfreezing act on). Every number
comes from the service's own code path: samples go into a store (``Store.insert``),
unlabeled traffic into the prediction log (``store.predictions.insert``: 1,000
shifted inputs, what serving would log), each update is a run through the worker's
function (``execute_run``: target data from the log → AdaBN/DANN → the loop →
registry), and the candidate is evaluated on held-out digits. The text shift
(``--no-text`` skips it; it needs this machine's apt lists): Debian package
descriptions (``continual.demo.debian``), the 8 sections as classes, application
packages as the source domain and support packages (libraries, bindings, -dev,
-data, -doc) as the shift, each embedded once by the frozen all-MiniLM-L6-v2
(``bench/classes_text.py``) and fed as 384-d vectors to the same MLP; the archive
has ~1,100 support packages in these sections, so 300 are held out, 200 to label
and the rest (639) the unlabeled traffic.

Part 1, per shift: a champion bootstrapped on 900 original digits; an update with
N = 0, 20, 50, 200 labeled shifted samples (stored as feedback: the store's
holdout split keeps ~20% of them out of training, as it would in service) plus the
1,000 unlabeled logged inputs, for each method. N = 0: the champion re-imported
with data cutoff 0, so the run trains on the old labeled data plus the target
data. Printed: accuracy on 300 held-out shifted digits, and on 300 held-out
original digits (old domain) with the change from the champion (forgetting < 0).
AdaBN: the MLP has no BatchNorm, so the run records that it does not apply and
trains like "none" — its row says so. Where it applies, on the images: the same
updates (N = 20, 50, 200; naive) with the frozen EfficientNet-Lite0 (BatchNorm) and
a linear head in the run, "none" vs "adabn" (the slowest part: every AdaBN run
re-embeds its data with the new statistics; ``--no-images`` skips it). The target:
on at least one shift, an adaptation method (AdaBN, DANN, progressive unfreezing,
DANN+replay+EWC) with 20 labels at least as accurate on the shift as "none" with
50, forgetting at most 0.02 — as means over ``--target-seeds`` (3, 4, 5: each its
own split and champion), not the seeds the recipe was chosen on (0-2: learning
rate 1e-3 instead of 3e-3, replay ratio 0.85 instead of 0.5; see the README).

Part 2, on the first shift: the champion predicts 1,000 shifted inputs (logged
with their top-5 scores); N = 25, 50, 100 of them get labels, chosen by the label
queue (``continual.learn.labelqueue.next_items``) with each strategy — ``typical``
(the default: one input per k-means cluster of the champion's embeddings, the
nearest its centre) and ``uncertain`` (smallest margins, thinned by greedy
k-center) — or at random, then the same update (replay+ewc, with the recipe this
part was first measured with: ``QUEUE_RECIPE``, lr 3e-3, replay ratio 0.5). Ten
seeds (each its own split and champion; the issue asks for five, but the effect is
a few hundredths and the seed-to-seed spread ±0.05): mean and spread of the
accuracy on the shifted holdout. Target: the queue beats random by >= 0.02 at
N = 50 on average.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from continual.config import ModelSettings, Settings, settings_from_dict
from continual.demo.debian import NoAptLists
from continual.demo.digits import digit_images, png, shift
from continual.learn.labelqueue import next_items
from continual.learn.run import create_run, execute_run
from continual.models import Classifier, build_model
from continual.models.features import embed_rows
from continual.registry import Registry
from continual.store import NewSample, PredictionRecord, Store

LABELS = (0, 20, 50, 200)
IMAGE_LABELS = (20, 50, 200)  # N = 0 re-embeds the whole old set per run: left out to keep the bench near 10 min
QUEUE_N = (25, 50, 100)
UNLABELED = 1_000
METHODS: dict[str, dict[str, Any]] = {
    "none": {"strategy": "naive"},
    "adabn": {"strategy": "naive", "adaptation": "adabn"},
    "dann": {"strategy": "naive", "adaptation": "dann"},
    "progressive": {"strategy": "naive", "unfreeze_schedule": "progressive"},
    "replay+ewc": {"strategy": "replay+ewc"},
    "dann+replay+ewc": {"strategy": "replay+ewc", "adaptation": "dann"},
}
# The methods that use the unlabeled traffic or change how the model adapts (replay+ewc alone is the
# service's default update, shown for reference: it does not count for the target).
ADAPTATION = ("adabn", "dann", "progressive", "dann+replay+ewc")
# The recipe (learning rate, replay ratio) was chosen on seeds 0-2 from a few settings (README,
# "Adapting to a new domain"); the target is checked on other seeds (--target-seeds).
TRAINING: dict[str, Any] = {
    "epochs": 10,
    "early_stopping_patience": 10,
    "learning_rate": 1e-3,
    "head_learning_rate": 1e-3,
    "batch_size": 32,
    "replay_buffer": 400,
    "replay_ratio": 0.85,
    "ewc_lambda": 3.0,
    "device": "cpu",
    "cpu_threads": 2,
}

# Part 2 keeps the recipe it was first measured with (part 1's gentler one moves the model less
# per label: over five seeds the uncertain queue's gain was +0.105 at N = 25 and +0.003 at N = 50).
QUEUE_RECIPE: dict[str, Any] = {"learning_rate": 3e-3, "head_learning_rate": 3e-3, "replay_ratio": 0.5}


@dataclass(frozen=True)
class _Png:
    seq: int
    external_id: str
    kind: str
    payload: bytes
    sha256: str


def features(size: int) -> tuple[dict[str, np.ndarray], dict[str, list[_Png]], np.ndarray]:
    """EfficientNet-Lite0 (ImageNet, frozen) embeddings of every digit in each phase, the PNGs, and the labels."""
    images, y = digit_images()
    spec = {"kind": "image", "size": [size, size], "channels": 3}
    model = build_model(ModelSettings(architecture="efficientnet_lite0", input=spec)).eval()
    out, pngs = {}, {}
    for phase in ("original", "inverted", "transposed"):
        encoded = [png(im) for im in shift(images, phase)]
        pngs[phase] = [
            _Png(i, f"{phase}-{i}", "image", p, hashlib.sha256(p).hexdigest()) for i, p in enumerate(encoded)
        ]
        out[phase] = embed_rows(model, pngs[phase], spec=ModelSettings(input=spec).input, batch_size=128)
    return out, pngs, y


def bench_settings(
    work: Path, training: dict[str, Any], dim: int, classes: int = 10, queue: dict[str, Any] | None = None
) -> Settings:
    return settings_from_dict(
        {
            "service": {"data_dir": str(work)},
            "store": {"url": f"sqlite:///{work / 'store.db'}", "holdout_fraction": 0.2},
            "model": {
                "architecture": "mlp",
                "weights": "none",
                "mode": "all",
                "hidden": [128, 64],
                "classes": [str(c) for c in range(classes)],
                "input": {"kind": "vector", "shape": [dim]},
            },
            "training": {**TRAINING, **training},
            "adaptation": {"target": "latest", "target_samples": UNLABELED, "warmup_steps": 10},
            "accuracy": {"calibrate": False},
            "label_queue": queue or {},
        }
    )


def insert(store: Store, x: np.ndarray, y: np.ndarray, idx: np.ndarray, prefix: str) -> None:
    batch = [NewSample(f"{prefix}-{i}", str(int(y[i])), "vector", x[i].astype("<f4").tobytes()) for i in idx]
    for i in range(0, len(batch), 500):
        store.insert(batch[i : i + 500])


def prediction_id(seed: int, i: int) -> str:
    """A fixed id in time order: serving's ids carry 80 random bits, and a label's sample id (hence its
    holdout/validation split, by hash) comes from it — fixed ids make a run repeatable."""
    return f"B{seed:03d}{i:022d}"


def log_inputs(store: Store, x: np.ndarray, model: Classifier | None, version: str, seed: int) -> list[str]:
    """Unlabeled traffic as serving logs it: the input, and the champion's top-5 scores."""
    scores = torch.softmax(model(torch.from_numpy(x)), 1).detach().numpy() if model is not None else None
    now, records = datetime.now(UTC), []
    for i, v in enumerate(x):
        payload = v.astype("<f4").tobytes()
        top = np.argsort(-scores[i])[:5] if scores is not None else np.arange(1)
        s = {str(int(c)): float(scores[i][c]) for c in top} if scores is not None else None
        records.append(
            PredictionRecord(
                id=prediction_id(seed, i), created_at=now, model_version=version,
                label=str(int(top[0])), confidence=float(s[str(int(top[0]))]) if s else 0.5, scores=s,
                kind="vector", sha256=hashlib.sha256(payload).hexdigest(), payload=payload, input_policy="all",
            )
        )  # fmt: skip
    store.predictions.insert(records)
    return [r.id for r in records]


def run(store: Store, settings: Settings) -> dict[str, Any]:
    row = execute_run(store, settings.resolved_store(), create_run(store, settings, trigger="bench"),
                      open_files=lambda s: Registry(s.models_dir, store))  # fmt: skip
    if row["status"] != "succeeded":
        raise RuntimeError(f"run {row['id']} {row['status']}: {row['error']}")
    return row


def accuracy(model: Classifier, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@dataclass(frozen=True)
class Shift:
    """One shift for one seed: a source domain's labeled vectors and a shifted domain's, and who is what."""

    name: str
    src_x: np.ndarray
    src_y: np.ndarray
    tgt_x: np.ndarray
    tgt_y: np.ndarray
    train: np.ndarray  # source, labeled: the champion's data
    old_test: np.ndarray  # source, held out
    new_test: np.ndarray  # shifted, held out
    labeled: np.ndarray  # shifted, the labeled pool (an update with N labels takes the first N)
    unlabeled: np.ndarray  # shifted, logged unlabeled

    @property
    def dim(self) -> int:
        return int(self.src_x.shape[1])

    @property
    def classes(self) -> int:
        return int(max(self.src_y.max(), self.tgt_y.max())) + 1


def digit_shift(feats: dict[str, np.ndarray], y: np.ndarray, phase: str, seed: int) -> Shift:
    """The same digits before and after ``phase``: 900 to train on, 300 + 300 held out, the rest to label;
    the unlabeled traffic is 1,000 shifted digits (the shifted twins of training digits among them)."""
    p = np.random.default_rng(seed).permutation(len(y))
    return Shift(phase, feats["original"], y, feats[phase], y, p[:900], p[900:1200], p[1200:1500], p[1500:],
                 p[:UNLABELED])  # fmt: skip


def text_shift(text: TextDomains, seed: int) -> Shift:
    """Debian application packages -> support packages (libraries, bindings, -dev, -data, -doc), same sections:
    900 applications to train on and 300 held out; 300 support packages held out, 200 to label, the rest
    (fewer than 1,000: the archive has about 1,100 in these sections) logged unlabeled."""
    src = np.random.default_rng([seed, 0]).permutation(len(text.app_y))
    tgt = np.random.default_rng([seed, 1]).permutation(len(text.support_y))
    return Shift("text: apps -> support", text.app_x, text.app_y, text.support_x, text.support_y,
                 src[:900], src[900:1200], tgt[:300], tgt[300:500], tgt[500 : 500 + UNLABELED])  # fmt: skip


@dataclass(frozen=True)
class TextDomains:
    app_x: np.ndarray
    app_y: np.ndarray
    support_x: np.ndarray
    support_y: np.ndarray


def text_domains(per_section: int = 150) -> TextDomains:
    """Frozen MiniLM embeddings (``bench/classes_text.py``) of ``per_section`` application packages a section
    and of every support package of the eight sections; labels index ``debian.CLASSES``.
    :class:`~continual.demo.debian.NoAptLists` without apt lists."""
    from classes_text import embed

    from continual.demo.debian import CLASSES, packages, stable_order

    pkgs = packages()
    apps = [
        q for c in CLASSES for q in stable_order([p for p in pkgs if p.section == c and not p.support], 0)[:per_section]
    ]
    support = stable_order([p for p in pkgs if p.support], 0)
    x, _ = embed([p.text for p in apps + support])
    y = np.array([CLASSES.index(p.section) for p in apps + support], dtype=np.int64)
    return TextDomains(x[: len(apps)], y[: len(apps)], x[len(apps) :], y[len(apps) :])


def bootstrap(base: Path, sh: Shift, seed: int, recipe: dict[str, Any] | None = None) -> tuple[str, float]:
    """The champion: a run on the source's training samples, promoted; (version, its source accuracy)."""
    settings = bench_settings(base, {"strategy": "replay+ewc", "seed": seed, **(recipe or {})}, sh.dim, sh.classes)
    store = Store.from_settings(settings)
    store.upgrade()
    insert(store, sh.src_x, sh.src_y, sh.train, f"o{seed}")
    registry = Registry(settings.models_dir, store)
    version = run(store, settings)["candidate_version"]
    registry.promote(version, expected=None, reason="manual")
    old = accuracy(registry.load_model(version, settings), sh.src_x[sh.old_test], sh.src_y[sh.old_test])
    store.dispose()
    return version, old


def update(
    base: Path, work: Path, method: dict[str, Any], sh: Shift, n: int, seed: int
) -> tuple[float, float, dict[str, Any]]:
    """(shifted accuracy, old-domain accuracy, the run's adaptation record) after one update."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    settings = bench_settings(work, {**method, "seed": seed}, sh.dim, sh.classes)
    store = Store.from_settings(settings)
    registry = Registry(settings.models_dir, store)
    champion = store.versions.champion_version()
    if n == 0:
        # Nothing new is labeled: the champion's own data counts as new, so the run trains on it plus the target.
        m = registry.import_model(
            registry.load_model(champion, settings), input_spec=settings.model.input.model_dump(mode="json"),
            data_cutoff=0, extra=None,
        )  # fmt: skip
        champion = m.version
    else:
        insert(store, sh.tgt_x, sh.tgt_y, sh.labeled[:n], f"s{seed}")
    log_inputs(store, sh.tgt_x[sh.unlabeled], None, champion, seed)
    row = run(store, settings)
    model = registry.load_model(row["candidate_version"], settings)
    out = (
        accuracy(model, sh.tgt_x[sh.new_test], sh.tgt_y[sh.new_test]),
        accuracy(model, sh.src_x[sh.old_test], sh.src_y[sh.old_test]),
        row["metrics"]["adaptation"],
    )
    store.dispose()
    return out


def part1(root: Path, shifts: list[Shift], seed: int) -> list[str]:
    lines: list[str] = []
    for k, sh in enumerate(shifts):
        base = root / f"p1-base-{k}"
        champion, old0 = bootstrap(base, sh, seed)
        settings = bench_settings(base, {}, sh.dim, sh.classes)
        store = Store.from_settings(settings)
        model = Registry(settings.models_dir, store).load_model(champion, settings)
        new0 = accuracy(model, sh.tgt_x[sh.new_test], sh.tgt_y[sh.new_test])
        store.dispose()
        lines.append(f"shift {sh.name}: champion {new0:.3f} on the shift, {old0:.3f} on the old domain (seed {seed})")
        lines.append(f"  {'method':<16}" + "".join(f"  N={n:<3} new   old (chg)" for n in LABELS))
        notes: dict[str, str] = {}
        for name, method in METHODS.items():
            cells = []
            for n in LABELS:
                t0 = time.perf_counter()
                new, old, info = update(base, root / "work", method, sh, n, seed)
                cells.append(f"  {new:.3f} {old:.3f} ({old - old0:+.3f})")
                if "skipped" in info:
                    notes[name] = str(info["skipped"])
                print(f"    [{sh.name} {name} N={n}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
            lines.append(f"  {name:<16}" + "".join(cells))
        for name, why in notes.items():
            lines.append(f"  {name}: skipped by the run: {why}")
    return lines


def target_check(root: Path, shifts_for: Callable[[int], list[Shift]], seeds: list[int]) -> list[str]:
    """The target, on seeds the recipe was not chosen on: per seed its own split and champion, then
    "none" with 50 labels and every other method with 20; means over the seeds."""
    cells: dict[tuple[str, str, int], tuple[float, float]] = {}  # (shift, method, seed) -> (new, old change)
    names: list[str] = []
    for seed in seeds:
        for k, sh in enumerate(shifts_for(seed)):
            names += [sh.name] if sh.name not in names else []
            base = root / f"target-base-{seed}-{k}"
            _, old0 = bootstrap(base, sh, seed)
            for name, method in METHODS.items():
                n = 50 if name == "none" else 20
                new, old, _ = update(base, root / "work", method, sh, n, seed)
                cells[sh.name, name, seed] = (new, old - old0)
                print(f"    [target {sh.name} {name} N={n} seed {seed}]", file=sys.stderr, flush=True)
    lines = [
        f"target on seeds {','.join(map(str, seeds))} (mean over seeds): an adaptation method with 20 labels "
        "at least as accurate on the shift as none with 50, old-domain change >= -0.02"
    ]
    met = []
    for shift_name in names:
        mean = {name: np.mean([cells[shift_name, name, sd] for sd in seeds], axis=0) for name in METHODS}
        none50 = mean["none"][0]
        lines.append(f"  {shift_name}: none@50 {none50:.3f} (old {mean['none'][1]:+.3f}); at N=20: "
                     + ", ".join(f"{name} {m[0]:.3f} ({m[1]:+.3f})" for name, m in mean.items() if name != "none"))  # fmt: skip
        ok = [name for name in ADAPTATION if mean[name][0] >= none50 and mean[name][1] >= -0.02]
        lines.append(f"    {'MET by ' + ', '.join(ok) if ok else 'NOT MET'}")
        met += ok
    lines.append(f"adaptation target (on at least one shift): {'MET' if met else 'NOT MET'}")
    return lines


def image_settings(work: Path, training: dict[str, Any], size: int) -> Settings:
    """The frozen EfficientNet-Lite0 (BatchNorm) with a linear head, on the PNGs: AdaBN's case."""
    return settings_from_dict(
        {
            "service": {"data_dir": str(work)},
            "store": {"url": f"sqlite:///{work / 'store.db'}", "holdout_fraction": 0.2},
            "model": {"architecture": "efficientnet_lite0", "mode": "feature_extraction",
                      "input": {"kind": "image", "size": [size, size], "channels": 3}},
            "training": {**TRAINING, "strategy": "naive", **training},
            "adaptation": {"target": "latest", "target_samples": UNLABELED},
            "accuracy": {"calibrate": False},
        }
    )  # fmt: skip


def image_accuracy(model: Classifier, settings: Settings, rows: list[_Png], y: np.ndarray) -> float:
    emb = embed_rows(model, rows, spec=settings.model.input, batch_size=128)
    with torch.inference_mode():
        return float((model.head(torch.from_numpy(emb)).argmax(1).numpy() == y).mean())


def part_adabn(root: Path, pngs: dict[str, list[_Png]], y: np.ndarray, s: Shift, seed: int, size: int) -> list[str]:
    """AdaBN where it applies: the same updates on the images (``s``'s digits), the frozen BatchNorm backbone in the run."""
    phase = s.name
    base = root / "adabn-base"
    settings = image_settings(base, {"seed": seed}, size)
    store = Store.from_settings(settings)
    store.upgrade()
    store.insert([NewSample(f"o{seed}-{i}", str(int(y[i])), "image", pngs["original"][i].payload) for i in s.train])
    registry = Registry(settings.models_dir, store)
    champion = run(store, settings)["candidate_version"]
    registry.promote(champion, expected=None, reason="manual")
    model = registry.load_model(champion, settings)
    new_test, old_test = [pngs[phase][i] for i in s.new_test], [pngs["original"][i] for i in s.old_test]
    new0, old0 = (
        image_accuracy(model, settings, new_test, y[s.new_test]),
        image_accuracy(model, settings, old_test, y[s.old_test]),
    )
    store.dispose()
    lines = [f"AdaBN on the images ({phase}): frozen EfficientNet-Lite0 at {size}px + linear head, naive strategy; "
             f"champion {new0:.3f} on the shift, {old0:.3f} old"]  # fmt: skip
    lines.append(f"  {'method':<16}" + "".join(f"  N={n:<3} new   old (chg)" for n in IMAGE_LABELS))
    for name in ("none", "adabn"):
        cells = []
        for n in IMAGE_LABELS:
            t0 = time.perf_counter()
            work = root / "work"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base, work)
            st = image_settings(work, {"seed": seed, "adaptation": name}, size)
            store = Store.from_settings(st)
            registry = Registry(st.models_dir, store)
            parent = champion
            if n == 0:
                parent = registry.import_model(
                    registry.load_model(champion, st), input_spec=st.model.input.model_dump(mode="json"), data_cutoff=0
                ).version
            else:
                store.insert([NewSample(f"{phase}{seed}-{i}", str(int(y[i])), "image", pngs[phase][i].payload)
                              for i in s.labeled[:n]])  # fmt: skip
            log_image_inputs(store, [pngs[phase][i] for i in s.unlabeled], parent, seed)
            row = run(store, st)
            cand = registry.load_model(row["candidate_version"], st)
            new = image_accuracy(cand, st, new_test, y[s.new_test])
            old = image_accuracy(cand, st, old_test, y[s.old_test])
            cells.append(f"  {new:.3f} {old:.3f} ({old - old0:+.3f})")
            store.dispose()
            print(f"    [images {name} N={n}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
        lines.append(f"  {name:<16}" + "".join(cells))
    return lines


def log_image_inputs(store: Store, rows: list[_Png], version: str, seed: int) -> None:
    now = datetime.now(UTC)
    store.predictions.insert([
        PredictionRecord(id=prediction_id(seed, i), created_at=now, model_version=version, label="0",
                         confidence=0.5, scores=None, kind="image", sha256=r.sha256, payload=r.payload,
                         input_policy="all")
        for i, r in enumerate(rows)
    ])  # fmt: skip


def part2(root: Path, shift_for: Callable[[int], Shift], seeds: list[int]) -> list[str]:
    acc: dict[tuple[str, int], list[float]] = {}
    phase = ""
    for seed in seeds:
        s = shift_for(seed)
        phase = s.name
        base = root / f"p2-base-{seed}"
        champion, _ = bootstrap(base, s, seed, QUEUE_RECIPE)
        pool = s.unlabeled
        for n in QUEUE_N:
            for how in ("typical", "uncertain", "random"):
                work = root / "work"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(base, work)
                recipe = {"strategy": "replay+ewc", "seed": seed, **QUEUE_RECIPE}
                queue = {"strategy": how} if how != "random" else None
                settings = bench_settings(work, recipe, s.dim, s.classes, queue=queue)
                store = Store.from_settings(settings)
                registry = Registry(settings.models_dir, store)
                model = registry.load_model(champion, settings)
                ids = log_inputs(store, s.tgt_x[pool], model, champion, seed)
                if how != "random":
                    items = next_items(store, settings, model, settings.model.input, k=n, device=torch.device("cpu"))
                    chosen = [ids.index(i.candidate.id) for i in items]
                else:
                    chosen = np.random.default_rng([seed, n]).choice(len(pool), n, replace=False).tolist()
                now = datetime.now(UTC)
                store.insert([
                    NewSample(f"prediction:{ids[j]}", str(int(s.tgt_y[pool[j]])), "vector",
                              s.tgt_x[pool[j]].astype("<f4").tobytes(), prediction_id=ids[j], predicted_at=now)
                    for j in chosen
                ])  # fmt: skip
                row = run(store, settings)
                cand = registry.load_model(row["candidate_version"], settings)
                acc.setdefault((how, n), []).append(accuracy(cand, s.tgt_x[s.new_test], s.tgt_y[s.new_test]))
                store.dispose()
                print(f"    [{phase} seed {seed} {how} N={n}]", file=sys.stderr, flush=True)
    lines = [
        f"label queue vs random on {phase}, {len(seeds)} seeds (accuracy on the shifted holdout, mean ± sd; "
        "gain over random)"
    ]
    for n in QUEUE_N:
        r = np.array(acc["random", n])
        cells = []
        for how in ("typical", "uncertain"):
            q = np.array(acc[how, n])
            cells.append(f"{how} {q.mean():.3f} ± {q.std():.3f} ({q.mean() - r.mean():+.3f})")
        lines.append(f"  N={n:<3}  " + "   ".join(cells) + f"   random {r.mean():.3f} ± {r.std():.3f}")
    gain = np.mean(acc["typical", 50]) - np.mean(acc["random", 50])
    lines.append(
        f"  target (the queue, strategy typical, - random >= 0.02 at N=50): "
        f"{'MET' if gain >= 0.02 else 'NOT MET'} ({gain:+.3f})"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shifts", default="inverted,transposed")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9", help="part 2's seeds (part 1's table runs the first)")
    ap.add_argument("--target-seeds", default="3,4,5", help="part 1's target: mean over these seeds")
    ap.add_argument("--size", type=int, default=48, help="EfficientNet-Lite0 input size in px")
    ap.add_argument("--no-images", action="store_true", help="skip AdaBN on the images (the slowest part)")
    ap.add_argument("--no-text", action="store_true", help="skip the text shift (Debian apps -> support packages)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    feats, pngs, y = features(args.size)
    phases = args.shifts.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"features: EfficientNet-Lite0 at {args.size}px, {len(y)} digits x 3 phases, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    text: TextDomains | None = None
    if not args.no_text:
        t0 = time.perf_counter()
        try:
            text = text_domains()
        except NoAptLists as e:
            print(f"text shift skipped: {e}")
        else:
            print(f"text: all-MiniLM-L6-v2 (frozen) embeddings of {len(text.app_y)} application and "
                  f"{len(text.support_y)} support package descriptions, {time.perf_counter() - t0:.0f} s")  # fmt: skip

    def shifts_for(seed: int) -> list[Shift]:
        return [digit_shift(feats, y, p, seed) for p in phases] + ([text_shift(text, seed)] if text else [])

    with tempfile.TemporaryDirectory(prefix="continual-bench-adapt-") as tmp:
        for line in part1(Path(tmp), shifts_for(seeds[0]), seeds[0]):
            print(line, flush=True)
        for line in target_check(Path(tmp), shifts_for, [int(s) for s in args.target_seeds.split(",")]):
            print(line, flush=True)
        if not args.no_images:
            for line in part_adabn(Path(tmp), pngs, y, digit_shift(feats, y, phases[0], seeds[0]), seeds[0], args.size):
                print(line, flush=True)
        for line in part2(Path(tmp), lambda seed: digit_shift(feats, y, phases[0], seed), seeds):
            print(line, flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
