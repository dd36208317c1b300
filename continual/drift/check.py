"""One drift check: windows → champion embeddings → configured detectors → recorded decision.

The service's check job calls :func:`run_check` every tick and mirrors the
decision into its metrics; ``continual drift check`` calls it once. The caller
owns the embedding cache (one per process) and passes what only a serving process
has: its live model and its recent predictions. Detectors (``settings.drift.detectors``),
each one row of :data:`DETECTORS`:

- ``mmd``: kernel two-sample test on the champion's penultimate-layer embeddings,
  reference (old feedback) vs current (new feedback).
- ``ks``: per-feature KS on the same embeddings, projected onto ``ks_features``
  pooled-PCA axes (embeddings for vector inputs too: one code path, and the
  backbone is what the champion actually sees).
- ``label``: chi-square on the label counts of the two windows.
- ``prediction``: the champion's predicted class + confidence on the reference
  window vs the serving reservoir of recent ``/v1/predict`` requests. Needs no
  labels, so it sees drift in traffic first. Skipped (with a reason) when there
  is no serving process, the reservoir belongs to another version, or it is small.

Drift is detected when *any* detector that ran detected it (each already requires
``p < alpha`` and ``effect >= min_effect``): the detectors look at different
things, and a retrain still needs ``min_new_samples`` and passes the gate.

When the reference window, or every current window, is below ``min_samples``
there is nothing to test: the decision says "too few samples", and no row or
metric is written (an idle service would otherwise log an empty row every tick).

One piece (about 415 lines): the windows, the shared embeddings and the table of
detectors are one check; split, every part would pass the same windows around.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from continual.config import DriftSettings, InputSettings, Settings
from continual.drift.categorical import LabelShiftDetector, PredictionShiftDetector
from continual.drift.ks import KSDetector
from continual.drift.mmd import MMDDetector
from continual.drift.result import DriftResult
from continual.drift.windows import EmbeddingCache, Window, cache_key, select_windows
from continual.models.device import resolve_device
from continual.models.manifest import ModelSource
from continual.models.text import text_stats
from continual.store import Store

log = logging.getLogger("continual.drift")


class LiveModel(Protocol):
    """The model a serving process holds (``continual.serving.LiveModel``): embed with it, do not load a copy."""

    @property
    def version(self) -> str: ...

    @property
    def module(self) -> nn.Module: ...

    @property
    def device(self) -> torch.device: ...


class RecentPredictions(Protocol):
    """The serving process's recent predictions, oldest first (``continual.serving.ReservoirSnapshot``)."""

    @property
    def embeddings(self) -> np.ndarray: ...

    @property
    def predicted(self) -> np.ndarray: ...

    @property
    def confidence(self) -> np.ndarray: ...

    @property
    def version(self) -> str | None: ...


# The name each configured detector reports under (rows, metrics, reasons).
DETECTOR_NAMES = {
    "mmd": MMDDetector.name,
    "ks": KSDetector.name,
    "label": LabelShiftDetector.name,
    "prediction": PredictionShiftDetector.name,
}


@dataclass(frozen=True)
class DriftDecision:
    detected: bool
    results: list[DriftResult]
    n_reference: int
    n_current: int
    duration_seconds: float
    check_id: int | None
    reasons: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # detector name -> why it did not run
    champion: str | None = None
    # Text inputs: {"reference"|"current": {"texts", "unknown_token_rate", "mean_tokens", "truncated_rate"}}.
    text: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "detected": self.detected,
                "champion": self.champion,
                "n_reference": self.n_reference,
                "n_current": self.n_current,
                "duration_seconds": self.duration_seconds,
                "check_id": self.check_id,
                "reasons": self.reasons,
                **results_json(self.results, self.skipped, self.reasons),
                **({"text": self.text} if self.text is not None else {}),
            }
        )


def results_json(results: list[DriftResult], skipped: dict[str, str], reasons: list[str]) -> dict[str, Any]:
    """The drift_checks.results shape: ``{"detectors": [...], "reasons": [...]}`` (skipped ones too)."""
    rows: list[dict[str, Any]] = []
    for r in results:
        d = r.to_dict()
        details = d.pop("details")
        rows.append({**d, "skipped": None, "details": details})
    for name, why in skipped.items():
        rows.append(
            {
                "detector": name,
                "statistic": None,
                "p_value": None,
                "effect": None,
                "detected": False,
                "n_reference": 0,
                "n_current": 0,
                "skipped": why,
                "details": {},
            }
        )
    return json_safe({"detectors": rows, "reasons": list(reasons)})


def json_safe(value: Any) -> Any:  # Any: any JSON-ish value, numpy scalars and arrays included
    """NaN/inf → None, numpy scalars/arrays → Python: the row must be valid JSON on both stores."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


@dataclass(frozen=True)
class _Inputs:
    """What the detectors look at in one check."""

    drift: DriftSettings
    seed: int
    classes: tuple[str, ...]
    ref: Window
    cur: Window
    ref_emb: np.ndarray
    cur_emb: np.ndarray | None  # None when only the prediction detector runs
    predictions: RecentPredictions | None
    head: Callable[[], nn.Module]


def _mmd(i: _Inputs) -> DriftResult:
    d = i.drift
    det = MMDDetector(
        alpha=d.alpha,
        min_effect=d.mmd_min_effect,
        permutations=d.permutations,
        exact_max_n=2 * d.exact_max_samples,
        seed=i.seed,
    )
    return det.check(i.ref_emb, i.cur_emb)


def _ks(i: _Inputs) -> DriftResult:
    d = i.drift
    r = KSDetector(alpha=d.alpha, min_effect=d.min_effect, seed=i.seed).check(
        *pca_project(i.ref_emb, i.cur_emb, d.ks_features, seed=i.seed)  # type: ignore[arg-type]
    )
    return DriftResult(**{**r.to_dict(), "details": {**r.details, "projection": "pca", "features": d.ks_features}})


def _label(i: _Inputs) -> DriftResult:
    return _label_shift(i.ref, i.cur, i.classes, i.drift.alpha, i.drift.min_effect)


def _prediction(i: _Inputs) -> DriftResult:
    if i.predictions is None:
        raise ValueError("the prediction detector needs the serving process's recent predictions")
    head = i.head()
    with torch.inference_mode():
        logits = head(torch.from_numpy(i.ref_emb).to(next(head.parameters()).device))
        conf, pred = torch.softmax(logits.float(), dim=1).max(dim=1)
    det = PredictionShiftDetector(alpha=i.drift.alpha, min_effect=i.drift.min_effect, num_classes=len(i.classes))
    return det.check(pred.cpu().numpy(), i.predictions.predicted, conf.cpu().numpy(), i.predictions.confidence)


# name in [drift] detectors -> (reported name, what its current window is, the test)
DETECTORS: dict[str, tuple[str, str, Callable[[_Inputs], DriftResult]]] = {
    "mmd": (MMDDetector.name, "feedback", _mmd),
    "ks": (KSDetector.name, "feedback", _ks),
    "label": (LabelShiftDetector.name, "feedback", _label),
    "prediction": (PredictionShiftDetector.name, "predictions", _prediction),
}
# The name each configured detector reports under (rows, metrics, reasons).
DETECTOR_NAMES = {key: name for key, (name, _window, _test) in DETECTORS.items()}


def run_check(
    settings: Settings,
    store: Store,
    models: ModelSource,
    *,
    champion: str,
    cache: EmbeddingCache,
    live: LiveModel | None = None,
    predictions: RecentPredictions | None = None,
    record: bool = True,
) -> DriftDecision:
    """Run the configured detectors for ``champion``; record a drift_checks row unless ``record`` is off.

    ``live`` and ``predictions`` come from a serving process (None elsewhere: the
    prediction detector then reports itself skipped).
    """
    started = time.monotonic()
    d = settings.drift
    manifest = models.manifest(champion)
    ref, cur = select_windows(store, cutoff=manifest.data_cutoff, size=d.window, seed=settings.training.seed)
    wanted = list(dict.fromkeys(d.detectors))
    skipped: dict[str, str] = {}
    recent = _recent(predictions, champion, d.window, serving=live is not None or predictions is not None)
    feedback_ok = len(cur) >= d.min_samples
    for key in wanted:
        name, window, _ = DETECTORS[key]
        if window == "predictions" and isinstance(recent, str):
            skipped[name] = recent
        elif window == "predictions" and recent is not None and len(recent.predicted) < d.min_samples:
            skipped[name] = (
                f"the predict reservoir holds {len(recent.predicted)} predictions < min_samples {d.min_samples}"
            )
        elif window == "feedback" and not feedback_ok:
            skipped[name] = f"current window has {len(cur)} samples < min_samples {d.min_samples}"
    runnable = [k for k in wanted if DETECTORS[k][0] not in skipped]
    if len(ref) < d.min_samples or not runnable:
        why = (
            f"too few samples: reference window (old data, cutoff {manifest.data_cutoff}) has {len(ref)}, "
            f"current window has {len(cur)}"
            + (f", predict reservoir has {len(recent.predicted)}" if not isinstance(recent, str) else "")
            + f"; min_samples is {d.min_samples}"
        )
        return DriftDecision(False, [], len(ref), len(cur), time.monotonic() - started, None, [why], skipped, champion)

    key = cache_key(models.root, champion)
    device = live.device if live is not None and live.version == champion else resolve_device(settings.serving.device)

    def model() -> nn.Module:
        # The serving process already holds the champion: embed with it rather than load a copy.
        if live is not None and live.version == champion:
            return live.module
        return cache.model(key, lambda: models.load_model(champion, settings).to(device).eval())

    spec = manifest.input_spec
    backbone = cache.backbone(key, model)
    # The training worker caches frozen-base features on disk under the same backbone hash,
    # computed with the configured input spec: reuse them only when that is the champion's.
    seed_dir = settings.service.data_dir / "cache" / "features" if spec == settings.model.input else None

    def emb(w: Window) -> np.ndarray:
        return cache.embed(
            backbone,
            w,
            model=model,
            store=store,
            spec=spec,
            device=device,
            seed_dir=seed_dir,
            max_pixels=settings.ingest.max_image_pixels,
        )

    uses_feedback = any(DETECTORS[k][1] == "feedback" and k != "label" for k in runnable)
    inputs = _Inputs(
        drift=d,
        seed=settings.training.seed,
        classes=tuple(manifest.classes),
        ref=ref,
        cur=cur,
        ref_emb=emb(ref),
        cur_emb=emb(cur) if uses_feedback else None,
        predictions=None if isinstance(recent, str) else recent,
        head=lambda: model().head,  # type: ignore[return-value]
    )
    results = [DETECTORS[k][2](inputs) for k in runnable]
    text = {"reference": window_text_stats(store, ref, spec), "current": window_text_stats(store, cur, spec)} if (
        spec.kind == "text"
    ) else None  # fmt: skip
    detected = any(r.detected for r in results)
    reasons = [_reason(r) for r in results] + [f"{name} skipped: {why}" for name, why in skipped.items()]
    n_current = len(cur) if feedback_ok else (len(recent.predicted) if not isinstance(recent, str) else len(cur))
    duration = time.monotonic() - started
    check_id = None
    if record:
        check_id = store.records.add_drift_check(
            champion=champion,
            detected=detected,
            n_reference=len(ref),
            n_current=n_current,
            duration_seconds=duration,
            results={**results_json(results, skipped, reasons), **({"text": text} if text is not None else {})},
        )
    log.info(
        "drift check vs %s: %s (%s) in %.2fs, %d embedded, %d cached",
        champion,
        "DRIFT" if detected else "no drift",
        "; ".join(reasons),
        duration,
        cache.computed,
        cache.hits,
    )
    return DriftDecision(detected, results, len(ref), n_current, duration, check_id, reasons, skipped, champion, text)


def window_text_stats(store: Store, window: Window, spec: InputSettings) -> dict[str, float]:
    """The tokenizer's view of a window of text samples: [UNK] share, mean length, share cut at max_length."""
    texts = [row.payload.decode("utf-8") for chunk in store.payloads(window.seqs.tolist()) for row in chunk]
    s = text_stats(texts, spec)
    return {
        "texts": s.texts,
        "unknown_token_rate": s.unknown_rate,
        "mean_tokens": s.mean_tokens,
        "truncated_rate": s.truncated / s.texts if s.texts else 0.0,
    }


def pca_project(ref: np.ndarray, cur: np.ndarray, k: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both windows on the top-``k`` principal axes of the *pooled* sample (randomised PCA).

    Pooled, so the projection ignores which window a row came from and the KS test
    stays valid. Randomised (``torch.pca_lowrank``) rather than an eigendecomposition
    of the D x D covariance: for 1280-d embeddings that is ~50x cheaper, which matters
    for a check every few seconds on a small CPU.
    """
    if ref.shape[1] <= k:
        return ref, cur
    pooled = torch.from_numpy(np.concatenate([ref, cur]).astype(np.float32, copy=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(pooled, q=min(k, *pooled.shape), center=True, niter=4)
    mean = pooled.mean(0)
    z = ((pooled - mean) @ v).numpy()
    return z[: len(ref)], z[len(ref) :]


def _recent(
    predictions: RecentPredictions | None, champion: str, cap: int, *, serving: bool
) -> RecentPredictions | str:
    """The newest ``cap`` predictions of the champion, or why there are none to use."""
    if predictions is None:
        return (
            "this process keeps no predictions"
            if serving
            else "no serving process here: predict traffic lives in the service's memory"
        )
    if predictions.version != champion:
        return f"the predict reservoir holds predictions of {predictions.version or 'no model'}, not the champion {champion}"
    return _Recent(
        predictions.embeddings[-cap:], predictions.predicted[-cap:], predictions.confidence[-cap:], predictions.version
    )


@dataclass(frozen=True)
class _Recent:
    embeddings: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    version: str | None


def _label_shift(ref: Window, cur: Window, classes: tuple[str, ...], alpha: float, min_effect: float) -> DriftResult:
    # Labels the champion never saw (a new class) get indices after its own classes.
    index = {c: i for i, c in enumerate(classes)}
    for lab in sorted(set(ref.labels) | set(cur.labels)):
        index.setdefault(lab, len(index))
    det = LabelShiftDetector(alpha=alpha, min_effect=min_effect, num_classes=len(index))
    r = det.check(np.array([index[x] for x in ref.labels]), np.array([index[x] for x in cur.labels]))
    unseen = sorted(set(cur.labels) - set(classes))
    if not unseen:
        return r
    return DriftResult(**{**r.to_dict(), "details": {**r.details, "unknown_labels": unseen[:20]}})


def _reason(r: DriftResult) -> str:
    alpha, min_effect = r.details.get("alpha"), r.details.get("min_effect")
    verdict = "drift" if r.detected else "no drift"
    return (
        f"{r.detector}: {verdict} (p = {r.p_value:.3g} vs alpha {alpha}, effect = {r.effect:.3g} vs min_effect "
        f"{min_effect}; n = {r.n_reference} / {r.n_current})"
    )
