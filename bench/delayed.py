"""Delayed labels end to end: the digits stream through a real ``continual serve``, labels arriving
later by prediction id for a fraction of the predictions, live and estimated accuracy, the trigger.

1. A champion is bootstrapped by the service itself from ``--bootstrap`` original digits sent
   with their inputs (the run calibrates it on its holdout).
2. The other digits stream through ``/v1/predict`` in three phases — original, inverted,
   transposed (``continual.demo.digits``) — ``--phase`` predictions each at ``--rate`` per
   second. For a ``--label-fraction`` of them the label follows by prediction id after a
   gamma-distributed delay (shape 4, mean ``--delay`` s): ``{"prediction_id", "label"}``, no input.
3. The service closes windows of ``[accuracy] estimate_window`` predictions with their
   label-free estimates (ATC and mean confidence) and, with ``[triggers]
   min_estimated_accuracy``, starts a run when the estimate falls and enough labels exist.

Printed per phase: realized accuracy (all predictions, from the ground truth this script
knows), each estimate (mean over the phase's windows) and its error; for the shifted
phases, how far the first window wholly inside the phase dropped (estimate vs real, target:
at least half) and when the estimate fell below the threshold, the trigger fired, and the
labels would have allowed a label-driven detection and a run. Then feedback by reference vs
feedback with inputs, samples/s on a second server (target ratio >= 0.5).

    .venv/bin/python bench/delayed.py [--phase 800] [--rate 100] [--delay 10] [--label-fraction 0.3]
"""

from __future__ import annotations

import argparse
import heapq
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serverutil import ServerProcess  # noqa: E402
from testkit import merge  # noqa: E402

from continual.config import load_settings  # noqa: E402
from continual.demo.digits import PHASES, digit_images, shift  # noqa: E402
from continual.store import Store  # noqa: E402

WINDOW = 100
THRESHOLD = 0.8
CONFIG: dict[str, Any] = {
    "service": {"log_level": "warning"},
    "auth": {"enabled": False},
    "model": {
        "architecture": "mlp",
        "weights": "none",
        "mode": "all",
        "hidden": [64],
        "classes": [str(i) for i in range(10)],
        "input": {"kind": "vector", "shape": [64]},
    },
    "triggers": {
        "check_interval_seconds": 1,
        "min_new_samples": 150,
        "max_new_samples": 1_000_000,
        "max_interval_seconds": 86_400,
        "cooldown_seconds": 15,
        "min_estimated_accuracy": THRESHOLD,
    },
    "drift": {"detectors": ["mmd"], "window": 300, "min_samples": 50, "permutations": 100},
    "training": {
        "epochs": 8,
        "learning_rate": 0.003,
        "head_learning_rate": 0.003,
        "batch_size": 32,
        "device": "cpu",
        "cpu_threads": 1,
    },
    "gate": {"min_holdout_samples": 20, "max_old_forgetting": 0.05, "significance": 0.05, "min_accuracy": 0.6},
    "serving": {"device": "cpu", "max_batch": 64, "log_flush_seconds": 0.1},
    "accuracy": {"estimate_window": WINDOW, "interval_seconds": 0.5, "min_labels": 20, "live_window": 200},
}


@dataclass
class Logged:
    phase: str
    at: float  # seconds since the stream started
    truth: str
    label: str
    version: str


@dataclass
class Stream:
    t0: float = field(default_factory=time.monotonic)
    wall0: float = field(default_factory=time.time)
    predictions: dict[str, Logged] = field(default_factory=dict)
    phase_start: dict[str, float] = field(default_factory=dict)
    labels_sent: list[tuple[float, str, str]] = field(default_factory=list)  # (t, phase, prediction id)
    errors: list[str] = field(default_factory=list)


def arrays() -> tuple[np.ndarray, np.ndarray]:
    images, y = digit_images()
    order = np.random.default_rng(0).permutation(len(y))
    return images[order], y[order]


def bootstrap(server: ServerProcess, images: np.ndarray, y: np.ndarray) -> str:
    x = images.reshape(len(images), -1)
    samples = [{"id": f"boot-{i}", "label": str(int(y[i])), "x": x[i].tolist()} for i in range(len(y))]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for i in range(0, len(samples), 300):
            r = http.post("/v1/feedback", json={"samples": samples[i : i + 300]})
            r.raise_for_status()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            champ = http.get("/v1/status").json()["champion"]
            if champ and http.get("/readyz").status_code == 200:
                return str(champ["version"])
            time.sleep(0.5)
    raise TimeoutError(f"no champion after the bootstrap run:\n{server.log_tail()}")


def labeler(
    server: ServerProcess, stream: Stream, due: list[tuple[float, str, str, str]], done: threading.Event
) -> None:
    """Send each due label by prediction id (batched every 0.2 s) until the stream is done and none are left."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        while not (done.is_set() and not due):
            now = time.monotonic() - stream.t0
            batch = []
            while due and due[0][0] <= now:
                _, pid, label, phase = heapq.heappop(due)
                batch.append({"prediction_id": pid, "label": label})
                stream.labels_sent.append((now, phase, pid))
            if batch:
                r = http.post("/v1/feedback", json={"samples": batch})
                if r.status_code != 200:
                    stream.errors.append(f"feedback {r.status_code}: {r.text[:300]}")
            time.sleep(0.2)


def run_stream(server: ServerProcess, images: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> Stream:
    rng = np.random.default_rng(1)
    stream = Stream()
    due: list[tuple[float, str, str, str]] = []  # a heap of (when, prediction id, label, phase)
    done = threading.Event()
    thread = threading.Thread(target=labeler, args=(server, stream, due, done), daemon=True)
    thread.start()
    per_request = 10
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for phase in PHASES:
            stream.phase_start[phase] = time.monotonic() - stream.t0
            order = rng.permutation(len(y))[: args.phase]
            x = shift(images[order], phase).reshape(len(order), -1)
            for start in range(0, len(order), per_request):
                target = stream.phase_start[phase] + start / args.rate
                time.sleep(max(0.0, target - (time.monotonic() - stream.t0)))
                idx = range(start, min(start + per_request, len(order)))
                r = http.post("/v1/predict", json={"inputs": [{"x": x[i].tolist()} for i in idx]})
                r.raise_for_status()
                body = r.json()
                now = time.monotonic() - stream.t0
                for i, p in zip(idx, body["predictions"], strict=True):
                    truth = str(int(y[order[i]]))
                    stream.predictions[p["prediction_id"]] = Logged(
                        phase, now, truth, p["label"], body["model_version"]
                    )
                    if rng.random() < args.label_fraction:
                        # Erlang(4): labels take a while (a review queue), a few come quickly, a few very late.
                        delay = rng.gamma(4.0, args.delay / 4.0)
                        heapq.heappush(due, (now + delay, p["prediction_id"], truth, phase))
    done.set()
    thread.join()
    return stream


def since(stream: Stream, when: datetime) -> float:
    return when.timestamp() - stream.wall0


def _f(v: float | None, width: int = 7) -> str:
    return f"{v:{width}.3f}" if v is not None else " " * (width - 1) + "-"


def report(server: ServerProcess, stream: Stream) -> list[str]:
    """Per phase: realized accuracy, estimates, errors; per shift: the drop, and when it was seen and acted on."""
    settings = load_settings(server.config_path, env=server.env)
    store = Store.from_settings(settings)
    try:
        windows = list(reversed(store.predictions.windows(limit=10_000)))
        runs = list(reversed(store.runs.recent(limit=100)))
        decisions = {d["run_id"]: d for d in store.records.decisions()}
    finally:
        store.dispose()
    ids = sorted(stream.predictions)
    for w in windows:
        inside = [stream.predictions[p] for p in ids if w["first_id"] <= p <= w["last_id"]]
        phases = {p.phase for p in inside}
        w["last_phase"] = inside[-1].phase if inside else None
        w["phase"] = phases.pop() if len(phases) == 1 and len(inside) == w["n"] else "mixed"
        w["true"] = float(np.mean([p.label == p.truth for p in inside])) if inside else None
        w["at"] = since(stream, w["created_at"])
    methods = ("atc", "confidence", "atc_plain", "confidence_plain")
    lines = [
        f"{'phase':<11} {'realized':>8}"
        + "".join(f" {m:>16} {'err':>6}" for m in methods)
        + f" {'svc err (atc)':>13} {'windows':>7}  versions"
    ]
    rows: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        preds = [p for p in stream.predictions.values() if p.phase == phase]
        realized = float(np.mean([p.label == p.truth for p in preds]))
        ws = [w for w in windows if w["phase"] == phase]
        true = float(np.mean([w["true"] for w in ws])) if ws else None
        mean = {m: float(np.mean([w["estimates"][m] for w in ws])) if ws else None for m in methods}
        err = {m: mean[m] - true if mean[m] is not None and true is not None else None for m in methods}
        # What the service itself records: the estimate against the accuracy of the labeled predictions.
        labeled = [w for w in ws if w["n_labeled"] >= CONFIG["accuracy"]["min_labels"]]
        svc = (
            float(np.mean([w["estimates"]["atc"] - w["n_correct"] / w["n_labeled"] for w in labeled]))
            if labeled
            else None
        )
        rows[phase] = {"true": true, "mean": mean, "err": err, "windows": ws}
        versions = sorted({p.version[-6:] for p in preds})
        lines.append(
            f"{phase:<11} {realized:8.3f}"
            + "".join(f" {_f(mean[m], 16)} {_f(err[m], 6)}" for m in methods)
            + f" {_f(svc, 13)} {len(ws):>7}  {', '.join(versions)}"
        )
    base = rows["original"]
    best = min(("atc", "confidence"), key=lambda m: abs(base["err"][m]) if base["err"][m] is not None else 9.0)
    e = base["err"][best]
    ok = e is not None and abs(e) <= 0.03
    lines.append(f"in-distribution: better estimator {best}, |error| {abs(e or 0):.3f} (target <= 0.03) "
                 f"{'OK' if ok else 'MISSED'}")  # fmt: skip
    for phase in PHASES[1:]:
        first = next((w for w in windows if w["phase"] == phase), None)
        t_shift = stream.phase_start[phase]
        if first is None or base["true"] is None:
            lines.append(f"{phase}: no whole window in the phase")
            continue
        into = sum(1 for p in ids if stream.predictions[p].phase == phase and p <= first["last_id"])
        real_drop = base["true"] - first["true"]
        parts = []
        for m in methods:
            drop = base["mean"][m] - first["estimates"][m]
            parts.append(f"{m} {drop:+.3f} {'OK' if drop >= real_drop / 2 else 'MISSED'}")
        lines.append(
            f"{phase}: first whole window ({into} predictions into the phase): real drop from in-distribution "
            f"{real_drop:+.3f}; estimate drop " + ", ".join(parts) + " (target: at least half the real drop)"
        )
        # The first window that ends inside the phase with a low estimate (it may have begun before it).
        low = next((w for w in windows if w["last_phase"] == phase and w["estimates"]["atc"] < THRESHOLD), None)
        fired = next((r for r in runs if (r["trigger"] or "").startswith("estimated")
                      and since(stream, r["created_at"]) >= t_shift), None)  # fmt: skip
        labels = sorted(t for t, p, _ in stream.labels_sent if p == phase)
        min_labels, min_new = CONFIG["accuracy"]["min_labels"], CONFIG["triggers"]["min_new_samples"]

        def at(k: int, labels: list[float] = labels, t_shift: float = t_shift) -> str:
            return f"+{labels[k - 1] - t_shift:.1f} s" if len(labels) >= k else "never"

        run = "never"
        if fired is not None:
            outcome = decisions[fired["id"]]["outcome"] if fired["id"] in decisions else fired["status"]
            run = f"+{since(stream, fired['created_at']) - t_shift:.1f} s (run #{fired['id']}, {outcome})"
        lines.append(
            f"  {phase} began at +{t_shift:.1f} s: estimate (atc) < {THRESHOLD} known at "
            + (f"+{low['at'] - t_shift:.1f} s" if low else "never")
            + f"; trigger fired at {run}; labels of this phase: {min_labels} (a label-based check could see the "
            f"drop) at {at(min_labels)}, {min_new} (a run on this phase's labels alone) at {at(min_new)}"
        )
    lines.append("runs: " + "; ".join(
        f"#{r['id']} at +{since(stream, r['created_at']):.1f} s ({r['trigger']}) "
        + (decisions[r["id"]]["outcome"] if r["id"] in decisions else r["status"])
        for r in runs
    ))  # fmt: skip
    return lines


def ingest_rates(tmp: Path, images: np.ndarray, y: np.ndarray, n: int = 2_000) -> tuple[float, float]:
    """(with inputs, by reference) samples/s over HTTP, batches of 100, alternating chunks on one server."""
    cfg = merge(CONFIG, {"triggers": {"min_new_samples": 1_000_000, "max_new_samples": 1_000_000,
                                      "min_estimated_accuracy": 0.0}})  # fmt: skip
    server = ServerProcess(cfg, workdir=tmp / "rates")
    server.start()
    try:
        x = images.reshape(len(images), -1)
        boot = [{"id": f"b-{i}", "label": str(int(y[i])), "x": x[i].tolist()} for i in range(400)]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            http.post("/v1/feedback", json={"samples": boot}).raise_for_status()
            http.post("/v1/train", json={})  # auth is off: the manual run bootstraps a champion
            deadline = time.monotonic() + 600
            while http.post("/v1/predict", json={"inputs": [{"x": x[0].tolist()}]}).status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError(server.log_tail())
                time.sleep(0.5)
            pids = []
            for i in range(0, n, 50):
                body = {"inputs": [{"x": x[k % len(x)].tolist()} for k in range(i, i + 50)]}
                pids += [p["prediction_id"] for p in http.post("/v1/predict", json=body).json()["predictions"]]
            time.sleep(1)
            with_inputs = [[{"id": f"in-{k}", "label": str(int(y[k % len(y)])), "x": x[k % len(x)].tolist()}
                            for k in range(i, i + 100)] for i in range(0, n, 100)]  # fmt: skip
            by_ref = [[{"prediction_id": pids[k], "label": str(int(y[k % len(y)]))} for k in range(i, i + 100)]
                      for i in range(0, n, 100)]  # fmt: skip
            spent = {"in": 0.0, "ref": 0.0}
            for chunk in range(0, len(by_ref), 4):  # alternate 4 batches of each: the same machine load
                for name, batches in (("in", with_inputs), ("ref", by_ref)):
                    for batch in batches[chunk : chunk + 4]:
                        t = time.perf_counter()
                        r = http.post("/v1/feedback", json={"samples": batch})
                        spent[name] += time.perf_counter() - t
                        if r.status_code != 200 or r.json()["accepted"] != len(batch):
                            raise RuntimeError(f"feedback {name}: {r.status_code} {r.text[:300]}")
        return n / spent["in"], n / spent["ref"]
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=900, help="original digits sent with inputs first")
    parser.add_argument("--phase", type=int, default=800, help="predictions per phase")
    parser.add_argument("--rate", type=float, default=100.0, help="predictions per second")
    parser.add_argument("--delay", type=float, default=10.0, help="mean label delay, seconds (gamma, shape 4)")
    parser.add_argument("--label-fraction", type=float, default=0.3)
    args = parser.parse_args()
    images, y = arrays()
    boot_x, boot_y = images[: args.bootstrap], y[: args.bootstrap]
    stream_x, stream_y = images[args.bootstrap :], y[args.bootstrap :]
    args.phase = min(args.phase, len(stream_y))
    tmp = Path(tempfile.mkdtemp(prefix="continual-bench-delayed-"))
    print(
        f"delayed-labels bench: digits, MLP; bootstrap {args.bootstrap} original digits with inputs; then "
        f"{args.phase} predictions per phase ({', '.join(PHASES)}) at {args.rate:g}/s; labels by prediction id for "
        f"{args.label_fraction:.0%} of them after a gamma(4) delay (mean {args.delay:g} s); windows of "
        f"{WINDOW} predictions; min_estimated_accuracy {THRESHOLD}"
    )
    server = ServerProcess(CONFIG, workdir=tmp / "stream")
    server.start()
    try:
        champion = bootstrap(server, boot_x, boot_y)
        settings = load_settings(server.config_path, env=server.env)
        store = Store.from_settings(settings)
        from continual.registry import Registry

        cal = Registry(settings.models_dir, store).manifest(champion).extra.get("calibration", {})
        store.dispose()
        print(
            f"champion {champion}: holdout accuracy {cal.get('accuracy')}, temperature {cal.get('temperature')} "
            f"(NLL {cal.get('nll_before')} -> {cal.get('nll_after')}, n {cal.get('n')})"
        )
        stream = run_stream(server, stream_x, stream_y, args)
        time.sleep(4)  # the last windows settle and the accuracy job scores them
        for line in report(server, stream):
            print(line)
        if stream.errors:
            print(f"feedback errors: {len(stream.errors)}; first: {stream.errors[0]}")
    finally:
        server.stop()
    with_inputs, by_reference = ingest_rates(tmp, stream_x, stream_y)
    ratio = by_reference / with_inputs
    print(
        f"feedback with inputs: {with_inputs:,.0f} samples/s; by reference: {by_reference:,.0f} samples/s; "
        f"ratio {ratio:.2f} (target >= 0.50) {'OK' if ratio >= 0.5 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
