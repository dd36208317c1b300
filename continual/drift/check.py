"""One drift check: windows → champion embeddings → configured detectors → row, metrics, decision.

The daemon calls :func:`run_check` every tick (``daemon._drift_check``); ``continual
drift check`` calls it once. Detectors (``settings.drift.detectors``):

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
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sqlalchemy import insert

from continual.config import Settings
from continual.drift.categorical import LabelShiftDetector, PredictionShiftDetector
from continual.drift.ks import KSDetector
from continual.drift.mmd import MMDDetector
from continual.drift.result import DriftResult
from continual.drift.windows import EmbeddingCache, Window, cache_key, select_windows
from continual.metrics import Metrics
from continual.registry import Registry, model_settings_for
from continual.store import Store
from continual.store.engine import write_tx
from continual.store.schema import drift_checks

if TYPE_CHECKING:
    from continual.serving import Serving

log = logging.getLogger("continual.drift")

# The name each configured detector reports under (rows, metrics, reasons).
DETECTOR_NAMES = {
    "mmd": MMDDetector.name,
    "ks": KSDetector.name,
    "label": LabelShiftDetector.name,
    "prediction": PredictionShiftDetector.name,
}

# One per process: repeated checks against one champion reuse its model and embeddings.
DEFAULT_CACHE = EmbeddingCache()


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


def json_safe(value: Any) -> Any:
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


def run_check(
    settings: Settings,
    store: Store,
    registry: Registry,
    metrics: Metrics,
    *,
    serving: Serving | None = None,
    champion: str,
    cache: EmbeddingCache | None = None,
    record: bool = True,
) -> DriftDecision:
    """Run the configured detectors for ``champion``; write a drift_checks row and the metrics."""
    started = time.monotonic()
    d = settings.drift
    cache = cache if cache is not None else DEFAULT_CACHE
    manifest = registry.manifest(champion)
    ref, cur = select_windows(store, cutoff=manifest.data_cutoff, size=d.window, seed=settings.training.seed)
    wanted = list(dict.fromkeys(d.detectors))
    skipped: dict[str, str] = {}
    reasons: list[str] = []

    reservoir = _reservoir(serving, champion, d.window) if "prediction" in wanted else None
    if "prediction" in wanted and isinstance(reservoir, str):
        skipped[DETECTOR_NAMES["prediction"]] = reservoir
    elif "prediction" in wanted and reservoir is not None and len(reservoir[1]) < d.min_samples:
        skipped[DETECTOR_NAMES["prediction"]] = (
            f"the predict reservoir holds {len(reservoir[1])} predictions < min_samples {d.min_samples}"
        )
    feedback_ok = len(cur) >= d.min_samples
    if not feedback_ok:
        for name in wanted:
            if name != "prediction":
                skipped[DETECTOR_NAMES[name]] = f"current window has {len(cur)} samples < min_samples {d.min_samples}"
    runnable = [n for n in wanted if DETECTOR_NAMES[n] not in skipped]
    if len(ref) < d.min_samples or not runnable:
        why = (
            f"too few samples: reference window (old data, cutoff {manifest.data_cutoff}) has {len(ref)}, "
            f"current window has {len(cur)}"
            + (f", predict reservoir has {len(reservoir[1])}" if isinstance(reservoir, tuple) else "")
            + f"; min_samples is {d.min_samples}"
        )
        return DriftDecision(False, [], len(ref), len(cur), time.monotonic() - started, None, [why], skipped, champion)

    key = cache_key(registry.root, champion)
    live = serving.live if serving is not None else None
    device = _device(settings, live, champion)

    def model() -> torch.nn.Module:
        # The serving process already holds the champion: embed with it rather than load a copy.
        if live is not None and live.version == champion:
            return live.module
        return cache.model(key, lambda: registry.load_model(champion, settings).to(device).eval())

    spec = model_settings_for(manifest, settings).input
    backbone = cache.backbone(key, model)
    # The training worker caches frozen-base features on disk under the same backbone hash,
    # computed with the configured input spec: reuse them only when that is the champion's.
    seed_dir = settings.service.data_dir / "cache" / "features" if spec == settings.model.input else None

    def emb(w: Window) -> np.ndarray:
        return cache.embed(backbone, w, model=model, store=store, spec=spec, device=device, seed_dir=seed_dir)

    ref_emb = emb(ref)
    cur_emb = emb(cur) if feedback_ok and ({"mmd", "ks"} & set(runnable)) else None

    results: list[DriftResult] = []
    for name in runnable:
        if name == "mmd":
            det = MMDDetector(
                alpha=d.alpha,
                min_effect=d.mmd_min_effect,
                permutations=d.permutations,
                exact_max_n=2 * d.exact_max_samples,
                seed=settings.training.seed,
            )
            results.append(det.check(ref_emb, cur_emb))
        elif name == "ks":
            ks = KSDetector(alpha=d.alpha, min_effect=d.min_effect, seed=settings.training.seed)
            r = ks.check(*pca_project(ref_emb, cur_emb, d.ks_features, seed=settings.training.seed))
            results.append(
                DriftResult(**{**r.to_dict(), "details": {**r.details, "projection": "pca", "features": d.ks_features}})
            )
        elif name == "label":
            results.append(_label_shift(ref, cur, tuple(manifest.classes), d.alpha, d.min_effect))
        elif name == "prediction" and isinstance(reservoir, tuple):
            head = model().head
            with torch.inference_mode():
                logits = head(torch.from_numpy(ref_emb).to(next(head.parameters()).device))
                conf, pred = torch.softmax(logits.float(), dim=1).max(dim=1)
            _, res_pred, res_conf, _ = reservoir
            det = PredictionShiftDetector(alpha=d.alpha, min_effect=d.min_effect, num_classes=len(manifest.classes))
            results.append(det.check(pred.cpu().numpy(), res_pred, conf.cpu().numpy(), res_conf))

    detected = any(r.detected for r in results)
    for r in results:
        reasons.append(_reason(r))
    for name, why in skipped.items():
        reasons.append(f"{name} skipped: {why}")
    n_current = len(cur) if feedback_ok else (len(reservoir[1]) if isinstance(reservoir, tuple) else len(cur))
    duration = time.monotonic() - started
    check_id = None
    if record:
        check_id = _record(store, champion, detected, len(ref), n_current, duration, results, skipped, reasons)
        _update_metrics(metrics, results, skipped)
    log.info(
        "drift check vs %s: %s (%s) in %.2fs, %d embedded, %d cached",
        champion,
        "DRIFT" if detected else "no drift",
        "; ".join(reasons),
        duration,
        cache.computed,
        cache.hits,
    )
    return DriftDecision(detected, results, len(ref), n_current, duration, check_id, reasons, skipped, champion)


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


def _reservoir(
    serving: Serving | None, champion: str, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None] | str:
    """The newest ``cap`` reservoir rows, or why they cannot be used."""
    if serving is None:
        return "no serving process here: predict traffic lives in the service's memory"
    emb, pred, conf, version = serving.reservoir_snapshot()
    if version != champion:
        return f"the predict reservoir holds predictions of {version or 'no model'}, not the champion {champion}"
    return emb[-cap:], pred[-cap:], conf[-cap:], version


def _device(settings: Settings, live: Any, champion: str) -> torch.device:
    if live is not None and live.version == champion:
        return live.device
    name = settings.serving.device
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


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


def _record(
    store: Store,
    champion: str,
    detected: bool,
    n_reference: int,
    n_current: int,
    duration: float,
    results: list[DriftResult],
    skipped: dict[str, str],
    reasons: list[str],
) -> int:
    with write_tx(store.engine) as conn:
        res = conn.execute(
            insert(drift_checks).values(
                created_at=datetime.now(UTC),
                champion=champion,
                detected=detected,
                n_reference=n_reference,
                n_current=n_current,
                duration_seconds=duration,
                results=results_json(results, skipped, reasons),
            )
        )
        return int(res.inserted_primary_key[0])


def _update_metrics(m: Metrics, results: list[DriftResult], skipped: dict[str, str]) -> None:
    for r in results:
        if math.isfinite(r.effect):
            m.drift_score.labels(detector=r.detector).set(r.effect)
        if math.isfinite(r.p_value):
            m.drift_p_value.labels(detector=r.detector).set(r.p_value)
        m.drift_detected.labels(detector=r.detector).set(1 if r.detected else 0)
    for name in skipped:
        # A detector that could not run reports no drift rather than a stale alarm.
        m.drift_detected.labels(detector=name).set(0)
    m.drift_checks.inc()
    m.last_drift_check.set(time.time())
