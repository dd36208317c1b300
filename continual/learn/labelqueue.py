"""What to label next: unlabeled logged predictions a label would help most, spread over the embedding space.

Two strategies (``[label_queue] strategy``):

- ``"typical"`` (default): the newest ``typical_pool`` candidates are clustered into k
  groups by k-means on the champion's embeddings, and from each group the candidate
  nearest its centre is picked — k inputs that together look like the traffic, one
  per kind of input, rather than its odd corners. In every run of ``bench/adapt.py``
  it beat random picks at N = 50 by more than 0.02; ``"uncertain"`` ranged from
  +0.002 to +0.049 on the same seeds (the README has the numbers and the noise).
- ``"uncertain"``: the ``diversity_pool`` x k candidates with the smallest *margin*
  (the gap between the two highest calibrated scores they were served with: the model
  hesitated between two classes), thinned to k by greedy k-center: the most uncertain
  first, then each time the candidate farthest from everything picked.

Either way the items come out most uncertain first, and twenty near-copies of one
input are never handed out together. Without a model to embed with (a process
serving none), the queue ranks by margin alone. Picked items are leased
(``store.label_queue``) so two labelers get disjoint items.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import torch

from continual.config import InputSettings, Settings
from continual.models import Classifier
from continual.models.features import embed_rows
from continual.store import QueueCandidate, Store

ROUNDS = 3  # re-rank this often when a concurrent request leased some of the picks first


class BadQueueRequest(ValueError):
    """A label-queue request that cannot be answered as asked (422)."""

    def __init__(self, field: str, message: str) -> None:
        self.details = [{"field": field, "message": message}]
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class QueueItem:
    candidate: QueueCandidate
    margin: float
    leased_until: datetime


def margin(scores: Mapping[str, float] | None, confidence: float) -> float:
    """Top score minus the runner-up's; without logged scores, 2c - 1 (the smallest margin c allows)."""
    if not scores:
        return 2.0 * confidence - 1.0
    top = sorted(scores.values(), reverse=True)
    return float(top[0] - (top[1] if len(top) > 1 else max(0.0, 1.0 - top[0])))


def k_center(emb: np.ndarray, k: int, *, first: int = 0) -> list[int]:
    """Greedy k-center (farthest-first traversal) from ``first``: indices in pick order, at most ``k``."""
    n = len(emb)
    if k < 1 or n == 0:
        return []
    if not 0 <= first < n:
        raise ValueError(f"first must index one of the {n} rows, got {first}")
    x = np.asarray(emb, dtype=np.float64).reshape(n, -1)
    picked = [first]
    dist = np.linalg.norm(x - x[first], axis=1)
    dist[first] = -1.0
    while len(picked) < min(k, n):
        i = int(np.argmax(dist))
        picked.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
        dist[picked] = -1.0
    return picked


def rank(margins: np.ndarray, emb: np.ndarray | None, k: int, pool: int) -> list[int]:
    """The k picks: the ``pool`` x k smallest margins, thinned by k-center on ``emb`` (None: by margin alone)."""
    order = np.argsort(margins, kind="stable")[: max(k, pool * k)]
    if emb is None or len(order) <= k:
        return [int(i) for i in order[:k]]
    return [int(order[i]) for i in k_center(emb[order], k, first=0)]


def k_means(emb: np.ndarray, k: int, *, seed: int = 0, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each row, the k centres): k-means++ seeding from a fixed seed, then Lloyd's iterations.

    Distances by ``|x|^2 - 2 x.c + |c|^2``, so memory is rows x k, not rows x k x dims.
    """
    x = np.asarray(emb, dtype=np.float64).reshape(len(emb), -1)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} rows, got {k}")
    rng = np.random.default_rng(seed)
    first = int(rng.integers(n))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = np.stack(centres)
    sq = (x * x).sum(1)[:, None]
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        assign = (sq - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).argmin(1)
        moved = c.copy()
        for j in range(k):
            members = assign == j
            if members.any():
                moved[j] = x[members].mean(0)
        if np.allclose(moved, c):
            break
        c = moved
    return assign, c


def typical(margins: np.ndarray, emb: np.ndarray, k: int) -> list[int]:
    """The k picks: one per k-means cluster of ``emb``, the row nearest its centre; most uncertain first.

    A cluster left empty gives its place to the most uncertain rows not picked.
    """
    n = len(emb)
    if n <= k:
        picks = list(range(n))
    else:
        assign, centres = k_means(emb, k)
        x = np.asarray(emb, dtype=np.float64).reshape(n, -1)
        picks = []
        for j in range(k):
            members = np.flatnonzero(assign == j)
            if len(members):
                picks.append(int(members[np.argmin(((x[members] - centres[j]) ** 2).sum(1))]))
        taken = set(picks)
        picks += [int(i) for i in np.argsort(margins, kind="stable") if int(i) not in taken][: k - len(picks)]
    return sorted(picks, key=lambda i: (margins[i], i))


def check_k(k: int, settings: Settings) -> None:
    top = settings.label_queue.max_k
    if not 1 <= k <= top:
        raise BadQueueRequest("k", f"must be between 1 and {top} ([label_queue] max_k), got {k}")


def next_items(
    store: Store,
    settings: Settings,
    model: Classifier | None,
    spec: InputSettings,
    *,
    k: int,
    device: torch.device,
    holder: str = "",
    now: datetime | None = None,
) -> list[QueueItem]:
    """Up to ``k`` unlabeled logged predictions most worth a label, leased to ``holder``.

    ``model`` (the champion) embeds the pool (see the module docstring for the two
    strategies); without one the queue ranks by margin alone. Leases are timed by the
    database's clock (``now``, for tests, replaces it).
    """
    check_k(k, settings)
    q = settings.label_queue
    now = now or store.label_queue.clock()
    until = now + timedelta(seconds=q.lease_seconds)
    by_typicality = q.strategy == "typical" and model is not None
    items: list[QueueItem] = []
    for _ in range(ROUNDS):
        want = k - len(items)
        cands = store.label_queue.candidates(limit=q.candidates, now=now, kind=spec.kind)
        if not cands:
            break
        m = np.array([margin(c.scores, c.confidence) for c in cands])
        if by_typicality:
            pool = np.arange(min(len(cands), max(q.typical_pool, want)))  # the newest: what traffic looks like now
        else:
            pool = np.argsort(m, kind="stable")[: q.diversity_pool * want]
        emb = None
        if model is not None and len(pool) > want:
            emb = embed_rows(
                model, [cands[int(i)] for i in pool], spec=spec, device=device,
                max_pixels=settings.ingest.max_image_pixels,
            )  # fmt: skip
        if emb is not None and by_typicality:
            chosen = typical(m[pool], emb, want)
        else:
            chosen = rank(m[pool], emb, want, q.diversity_pool)
        picks = sorted((int(pool[i]) for i in chosen), key=lambda i: (m[i], i))  # handed out most uncertain first
        got = set(
            store.label_queue.lease([cands[i].id for i in picks], now=now, seconds=q.lease_seconds, holder=holder)
        )
        items += [QueueItem(cands[i], float(m[i]), until) for i in picks if cands[i].id in got]
        if len(items) >= k or len(got) == len(picks):
            break
    return items


def item_json(item: QueueItem, *, with_input: bool = True) -> dict[str, object]:
    """One item as the API and the export write it: the prediction, and its input as predict would take it."""
    c = item.candidate
    out: dict[str, object] = {
        "prediction_id": c.id,
        "label": c.label,
        "confidence": round(c.confidence, 6),
        "margin": round(item.margin, 6),
        "model_version": c.model_version,
        "predicted_at": c.created_at.isoformat(),
        "leased_until": item.leased_until.isoformat(),
    }
    if with_input:
        if c.kind == "vector":
            out["x"] = [float(v) for v in np.frombuffer(c.payload, dtype="<f4")]
        elif c.kind == "text":
            out["text"] = c.payload.decode("utf-8")
        else:
            out["image"] = base64.b64encode(c.payload).decode("ascii")
    return out


def items_json(items: Sequence[QueueItem], *, with_input: bool = True) -> list[dict[str, object]]:
    return [item_json(i, with_input=with_input) for i in items]
