"""What every demo shares: the service as a child process, an observer that feeds and measures it over HTTP,
the four-act story, and the timeline and report read back from the store (the audit trail).

``python -m continual.demo`` (images) and ``python -m continual.demo.text`` (text) differ only in their
data and configuration: each builds its phases and calls :func:`play`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from continual.client import Client
from continual.config import Settings, load_settings
from continual.store import Store, split_of

ROOT = Path(__file__).resolve().parents[2]


class StreamPhase(Protocol):
    """One phase of a demo stream: ids and labels, its samples as feedback, its inputs as predict takes them."""

    name: str
    ids: list[str]
    labels: list[str]

    def samples(self) -> list[dict[str, Any]]: ...

    def inputs(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...


def holdout_indices(phase: StreamPhase, fraction: float) -> list[int]:
    return [k for k, i in enumerate(phase.ids) if split_of(i, fraction) == "holdout"]


@dataclass(frozen=True)
class Story:
    """The four acts: ``first`` bootstraps, ``second`` drifts, ``poison`` is rejected, ``fourth`` drifts again."""

    title: str
    first: str
    second: str
    poison: str
    fourth: str
    captions: tuple[str, str, str, str]

    @property
    def measured(self) -> tuple[str, str, str]:
        return (self.first, self.second, self.fourth)


# -- the service -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    config: Path
    env: dict[str, str]
    log_path: Path
    url: str
    process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "continual.cli", *args, "--config", str(self.config)], env=self.env, check=True
        )

    def start(self) -> None:
        self.cli("db", "upgrade")
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "continual.cli", "serve", "--config", str(self.config)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the service exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the service did not answer within 300 s; see {self.log_path}")

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


# -- driving it --------------------------------------------------------------------------------
@dataclass
class Observer:
    client: Client
    phases: Mapping[str, StreamPhase]
    measured: Sequence[str]  # the phases whose holdouts every measurement covers, in order
    holdout_fraction: float
    started: float = field(default_factory=time.monotonic)
    accuracy: list[dict[str, Any]] = field(default_factory=list)  # one row per (time, champion)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def measure(self, label: str) -> None:
        """Accuracy of the serving champion on every phase's holdout, through /v1/predict."""
        row: dict[str, Any] = {"t": time.monotonic() - self.started, "event": label}
        for name in self.measured:
            ph = self.phases[name]
            idx = holdout_indices(ph, self.holdout_fraction)
            correct, version = 0, None
            for start in range(0, len(idx), 64):
                chunk = idx[start : start + 64]
                out = self.client.predict(ph.inputs(chunk))
                version = out["model_version"]
                correct += sum(p["label"] == ph.labels[k] for p, k in zip(out["predictions"], chunk, strict=True))
            row[name] = correct / max(1, len(idx))
            row["version"] = version
        self.accuracy.append(row)
        self.say(f"champion {row['version']}: " + ", ".join(f"{p} {row[p]:.2f}" for p in self.measured))

    def feed(self, phase: StreamPhase) -> None:
        sent = 0

        def progress(batch: Sequence[object], _result: object) -> None:
            nonlocal sent
            sent += len(batch)
            print(f"\r    {phase.name}: {sent}/{len(phase.ids)} samples sent", end="", flush=True)

        result = self.client.feedback(phase.samples(), batch_size=50, on_batch=progress)
        print()
        self.say(f"{phase.name}: {result.accepted} accepted, {result.duplicates} duplicates")

    def wait_for(self, what: str, done: Callable[[dict[str, Any]], bool], timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            st = self.client.status()
            run = st.get("active_run")
            line = f"    waiting for {what}: state {st['state']}, pending {st['samples']['pending']}"
            if run and run.get("progress"):
                p = run["progress"]
                line += f", run #{run['id']} {p.get('phase', '')} epoch {p.get('epoch', '-')} loss {p.get('loss', '-')}"
            if line != last:
                print("\r" + line[:150].ljust(150), end="", flush=True)
                last = line
            if done(st):
                print()
                return st
            time.sleep(1.0)
        print()
        raise SystemExit(f"timed out waiting for {what}")


def champion_of(st: dict[str, Any]) -> str | None:
    return (st.get("champion") or {}).get("version")


# -- the timeline and the report, read from the store (the audit trail) ---------------------------------------
def decisions(settings: Settings) -> list[dict[str, Any]]:
    return _read(settings, lambda store: store.records.decisions())


def _read(settings: Settings, query: Callable[[Store], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    store = Store.from_settings(settings)
    try:
        return query(store)
    finally:
        store.dispose()


def _num(v: object, spec: str) -> str:
    return format(v, spec) if isinstance(v, int | float) else "-"


def print_timeline(settings: Settings) -> list[tuple[datetime, str, dict[str, Any]]]:
    events: list[tuple[datetime, str, dict[str, Any]]] = []
    for d in _read(settings, lambda store: store.records.drift_checks()):
        events.append((d["created_at"], "drift", d))
    for r in _read(settings, lambda store: store.runs.recent(limit=10_000)):
        events.append((r["created_at"], "run", r))
    for g in _read(settings, lambda store: store.records.decisions()):
        events.append((g["created_at"], "gate", g))
    for c in _read(settings, lambda store: store.versions.history()):
        events.append((c["promoted_at"], "champion", c))
    events.sort(key=lambda e: e[0])
    print("\ntimeline")
    last_drift: bool | None = None
    for when, kind, row in events:
        ts = when.strftime("%H:%M:%S")
        if kind == "drift":
            if row["detected"] == last_drift and not row["detected"]:
                continue  # quiet checks are summarised by the next change
            last_drift = row["detected"]
            per = ", ".join(
                f"{r.get('detector')} p={_num(r.get('p_value'), '.3g')} effect={_num(r.get('effect'), '.3f')}"
                for r in (row.get("results") or {}).get("detectors", [])
                if isinstance(r, dict) and r.get("p_value") is not None
            )
            print(
                f"  {ts}  drift check: {'DRIFT' if row['detected'] else 'no drift'} "
                f"(ref {row['n_reference']}, cur {row['n_current']}) {per}"
            )
        elif kind == "run":
            print(
                f"  {ts}  run #{row['id']} ({row['trigger']}): {row['status']}"
                + (f" -> candidate {row['candidate_version']}" if row["candidate_version"] else "")
                + (f" [{row['error']}]" if row["error"] else "")
            )
        elif kind == "gate":
            m = row["metrics"] or {}
            nums = ", ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float))
            print(f"  {ts}  gate: {row['outcome'].upper()} {row['candidate']} by rule {row['rule']} ({nums})")
        else:
            print(f"  {ts}  champion <- {row['version']} ({row['reason']})")
    return events


def write_report(
    path: Path, accuracy: list[dict[str, Any]], timeline: list[Any], alpha: float, names: Sequence[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    xs = list(range(len(accuracy)))
    for name in names:
        ax1.plot(xs, [r[name] for r in accuracy], marker="o", label=f"{name} holdout")
    ax1.set_xticks(xs, [f"{r['event']}\n{r['version'][-6:] if r['version'] else '-'}" for r in accuracy])
    ax1.set_ylim(0, 1.02)
    ax1.set_ylabel("accuracy")
    ax1.set_title("champion accuracy on every phase's holdout, after each promotion")
    ax1.legend(loc="lower left")
    ax1.grid(alpha=0.3)

    drift = [(w, row) for w, kind, row in timeline if kind == "drift"]
    t0 = min((w for w, _k, _r in timeline), default=None)
    if drift and t0 is not None:
        detectors: dict[str, list[tuple[float, float]]] = {}
        for when, row in drift:
            for r in (row.get("results") or {}).get("detectors", []):
                if isinstance(r, dict) and r.get("p_value") is not None:
                    detectors.setdefault(r["detector"], []).append(
                        ((when - t0).total_seconds(), max(r["p_value"], 1e-6))
                    )
        for name, pts in detectors.items():
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        ax2.axhline(alpha, color="red", linestyle="--", label=f"alpha = {alpha}")
        for when, kind, row in timeline:
            if kind == "champion":
                ax2.axvline((when - t0).total_seconds(), color="green", alpha=0.5)
                ax2.annotate(f"promoted\n{row['version'][-6:]}", ((when - t0).total_seconds(), 1.5), fontsize=7)
        ax2.set_yscale("log")
        ax2.set_xlabel("seconds since the first event")
        ax2.set_ylabel("drift p-value")
        ax2.set_title("drift checks (green: promotions)")
        ax2.legend(loc="lower left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def play(story: Story, phases: Mapping[str, StreamPhase], *, config: Path, out: Path,
         overrides: Mapping[str, str] | None = None) -> int:  # fmt: skip
    """Run the four acts against a fresh ``continual serve``; print the timeline, write ``out/report.png``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    port = free_port()
    # The demo's own overrides: a fresh data dir, a free port, and a tick fast enough to watch.
    overrides = {
        "CONTINUAL_SERVICE__DATA_DIR": str(out / "data"),
        "CONTINUAL_SERVICE__PORT": str(port),
        "CONTINUAL_AUTH__ENABLED": "false",
        "CONTINUAL_TRIGGERS__CHECK_INTERVAL_SECONDS": "3",
        "CONTINUAL_TRIGGERS__COOLDOWN_SECONDS": "0",
        "CONTINUAL_SERVING__POLL_INTERVAL_SECONDS": "1",
        **(overrides or {}),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")} | overrides
    settings = load_settings(config, env=env)
    print(
        f"{story.title}: {settings.model.architecture} ({settings.model.weights}) on {settings.training.device}, "
        f"store {settings.resolved_store().url}"
    )
    print("overrides: " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    svc = Service(config, env, out / "service.log", f"http://127.0.0.1:{port}")
    client = Client(svc.url, timeout=120)
    obs = Observer(client, phases, story.measured, settings.store.holdout_fraction)
    code = 0
    try:
        svc.start()
        obs.say(f"service up at {svc.url} (log: {svc.log_path})")
        obs.say(f"act 1: {story.captions[0]}")
        obs.feed(phases[story.first])
        st = obs.wait_for("the first champion", lambda s: champion_of(s) is not None)
        obs.measure("bootstrap")

        obs.say(f"act 2: {story.captions[1]}")
        before = champion_of(st)
        obs.feed(phases[story.second])
        obs.wait_for("a new champion", lambda s: champion_of(s) not in (None, before))
        obs.measure(f"{story.second} learned")

        obs.say(f"act 3: {story.captions[2]}")
        before = champion_of(client.status())
        obs.feed(phases[story.poison])
        n_decisions = len(decisions(settings))
        train = client.train()
        obs.say(f"run #{train['run_id']} requested")
        obs.wait_for("the gate's decision", lambda s: len(decisions(settings)) > n_decisions)
        last = decisions(settings)[-1]
        obs.say(f"gate: {last['outcome']} ({last['rule']}): {'; '.join(last['reasons'])}")
        if champion_of(client.status()) != before:
            obs.say("UNEXPECTED: the poisoned candidate was promoted")
            code = 1
        # The poison stays stored (audit trail) but must not reach the next run.
        excluded = client.exclude(phases[story.poison].ids, reason="demo: random labels from a broken labeling job")
        obs.say(f"operator excluded {excluded['excluded']} poisoned samples (POST /v1/samples/exclude)")

        obs.say(f"act 4: {story.captions[3]}")
        before = champion_of(client.status())
        obs.feed(phases[story.fourth])
        obs.wait_for("a new champion", lambda s: champion_of(s) not in (None, before))
        obs.measure(f"{story.fourth} learned")
    finally:
        client.close()
        rc = svc.stop()
        obs.say(f"service stopped (exit code {rc})")
    timeline = print_timeline(settings)
    report = out / "report.png"
    write_report(report, obs.accuracy, timeline, settings.drift.alpha, story.measured)
    (out / "accuracy.json").write_text(json.dumps(obs.accuracy, indent=2))
    print(
        f"\nreport: {report}\ndata directory: {out / 'data'} (store: {settings.resolved_store().url}; log: {svc.log_path})"
    )
    return code or (0 if rc == 0 else 1)


def run(main: Callable[[], int]) -> int:
    """Ctrl-C stops the service cleanly (SIGTERM, exit 0) and exits 130 without a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        print("\ndemo interrupted; the service was stopped", file=sys.stderr)
        return 130
