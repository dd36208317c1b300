"""Model versions on disk (weights + manifest, written atomically), checksums, and the champion pointer.

A version is ``<root>/<version>/`` with ``weights.safetensors``, optional extra
tensor files (``fisher.safetensors``) and ``manifest.json``, which lists the
sha256 and size of every other file and is written last. The directory is
built under ``<root>/.tmp-<version>-<pid>@<host>``, every file and the directory
are fsynced, and one ``rename`` publishes it: a directory without a manifest
never exists under a version name, and a file whose checksum does not match
its manifest is never loaded.

The champion pointer is the newest ``champion_history`` row; moving it is one
transaction that also updates ``model_versions.status``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from continual.procutil import process_alive
from continual.store import Store
from continual.store.engine import read_tx, write_tx
from continual.store.schema import champion_history, model_versions

if TYPE_CHECKING:
    from continual.config import Settings
    from continual.metrics import Metrics
    from continual.models import Classifier

log = logging.getLogger("continual.registry")

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TMP_PREFIX = ".tmp-"
_VERSION_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}-[0-9a-f]{6}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_TMP_OWNER_RE = re.compile(r"-([0-9]+)@(.+)$")  # ".tmp-<version>-<pid>@<host>"; host names may hold dashes
# Test hook: SIGKILL this process at the named step of write_version (crash-safety tests).
CRASH_ENV = "CONTINUAL_TEST_CRASH_AT"
CRASH_STEPS = ("mkdir", "weights", "extra", "manifest", "fsync", "rename", "insert")
# ... and at "promote": inside the pointer-moving transaction, after the history row, before the statuses.


class ChecksumMismatch(RuntimeError):
    """A version file whose size or sha256 differs from its manifest."""

    def __init__(self, version: str, file: str, expected: str, actual: str) -> None:
        self.version, self.file, self.expected, self.actual = version, file, expected, actual
        super().__init__(
            f"model version {version}: {file} does not match its manifest (expected {expected}, found {actual}); "
            f"refusing to load it"
        )


class VersionNotFound(KeyError):
    def __init__(self, version: str, reason: str = "no such version") -> None:
        self.version = version
        super().__init__(version)
        self.message = f"model version {version!r}: {reason}"

    def __str__(self) -> str:
        return self.message


class NoPreviousChampion(LookupError):
    """Rollback asked for, but there is no earlier champion to go back to."""


@dataclass(frozen=True)
class Manifest:
    version: str
    architecture: str
    classes: tuple[str, ...]
    input: dict[str, Any]
    parent: str | None
    data_cutoff: int
    created_at: str
    files: dict[str, dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return json.dumps(d, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        d = json.loads(raw)
        d["classes"] = tuple(d["classes"])
        return cls(**d)


def new_version_id(now: datetime | None = None) -> str:
    """Sortable by creation time (microseconds), unique by a random suffix."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S.%f}-{secrets.token_hex(3)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class Registry:
    """Model versions under ``root`` plus their rows in the store."""

    def __init__(self, root: Path, store: Store, metrics: Metrics | None = None) -> None:
        self.root = Path(root)
        self.store = store
        self.metrics = metrics
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing ----------------------------------------------------------------
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
    ) -> Manifest:
        from safetensors.torch import save_file

        for name in extra_tensors or {}:
            if name == "weights" or not _NAME_RE.match(name):
                raise ValueError(f"extra_tensors name {name!r} must be letters, digits or _ and not 'weights'")
        version = new_version_id()
        tmp = self.root / f"{TMP_PREFIX}{version}-{os.getpid()}@{socket.gethostname()}"
        tmp.mkdir()
        _crash_point("mkdir")
        try:
            tensors = {"weights": state_dict, **dict(extra_tensors or {})}
            files: dict[str, dict[str, Any]] = {}
            for name, tensors_of in tensors.items():
                fname = f"{name}.safetensors"
                # safetensors refuses shared or non-contiguous storage: copy to plain CPU tensors.
                save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors_of.items()}, tmp / fname)
                _crash_point("weights" if name == "weights" else "extra")
                files[fname] = {"sha256": _sha256(tmp / fname), "size": (tmp / fname).stat().st_size}
            manifest = Manifest(
                version=version,
                architecture=architecture,
                classes=tuple(classes),
                input=json.loads(json.dumps(dict(input_spec), default=list)),
                parent=parent,
                data_cutoff=int(data_cutoff),
                created_at=datetime.now(UTC).isoformat(),
                files=files,
                metrics=dict(metrics or {}),
                run_id=run_id,
                extra=dict(extra or {}),
            )
            raw = manifest.to_json()
            (tmp / MANIFEST).write_bytes(raw)
            _crash_point("manifest")
            for fname in [*files, MANIFEST]:
                _fsync_file(tmp / fname)
            _fsync_dir(tmp)
            _crash_point("fsync")
            os.rename(tmp, self.root / version)
            _fsync_dir(self.root)
            _crash_point("rename")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._insert_row(manifest, hashlib.sha256(raw).hexdigest())
        _crash_point("insert")
        log.info("wrote model version %s (%s, parent %s, cutoff %d)", version, architecture, parent, data_cutoff)
        return manifest

    def _insert_row(self, m: Manifest, manifest_sha: str) -> None:
        try:
            with write_tx(self.store.engine) as conn:
                conn.execute(
                    insert(model_versions).values(
                        version=m.version,
                        parent=m.parent,
                        architecture=m.architecture,
                        created_at=datetime.fromisoformat(m.created_at),
                        data_cutoff=m.data_cutoff,
                        run_id=m.run_id,
                        status="candidate",
                        metrics=m.metrics,
                        manifest_sha256=manifest_sha,
                    )
                )
        except IntegrityError:
            pass  # another process adopted it first (see discard_unfinished)

    def set_metrics(self, version: str, metrics: Mapping[str, Any], status: str | None = None) -> None:
        """Record gate metrics (and optionally a status such as "rejected") on a version's row."""
        values: dict[str, Any] = {"metrics": dict(metrics)}
        if status is not None:
            values["status"] = status
        with write_tx(self.store.engine) as conn:
            if (
                conn.execute(
                    update(model_versions).where(model_versions.c.version == version).values(**values)
                ).rowcount
                == 0
            ):
                raise VersionNotFound(version)

    # -- reading ----------------------------------------------------------------
    def _dir(self, version: str) -> Path:
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise VersionNotFound(str(version), "not a version id")
        return self.root / version

    def manifest(self, version: str) -> Manifest:
        path = self._dir(version) / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise VersionNotFound(version, f"no manifest at {path}") from None
        try:
            return Manifest.from_json(raw)
        except (ValueError, TypeError, KeyError) as e:
            self._refused(version, MANIFEST, f"unreadable manifest: {e}")
            raise ChecksumMismatch(version, MANIFEST, "a valid manifest", f"unreadable ({e})") from None

    def verify(self, version: str) -> Manifest:
        """The manifest, after checking it against the store and every file against it."""
        m = self.manifest(version)
        with read_tx(self.store.engine) as conn:
            expected = conn.execute(
                select(model_versions.c.manifest_sha256).where(model_versions.c.version == version)
            ).scalar_one_or_none()
        if expected:
            actual = _sha256(self._dir(version) / MANIFEST)
            if actual != expected:
                self._refused(version, MANIFEST, f"sha256 {actual} != recorded {expected}")
                raise ChecksumMismatch(version, MANIFEST, expected, actual)
        for fname, meta in m.files.items():
            path = self._dir(version) / fname
            if not path.is_file():
                self._refused(version, fname, "missing")
                raise ChecksumMismatch(version, fname, meta["sha256"], "missing file")
            size = path.stat().st_size
            if size != meta["size"]:
                self._refused(version, fname, f"size {size} != {meta['size']}")
                raise ChecksumMismatch(version, fname, f"{meta['size']} bytes", f"{size} bytes")
            digest = _sha256(path)
            if digest != meta["sha256"]:
                self._refused(version, fname, f"sha256 {digest} != {meta['sha256']}")
                raise ChecksumMismatch(version, fname, meta["sha256"], digest)
        return m

    def _refused(self, version: str, fname: str, why: str) -> None:
        log.error("refusing model version %s: %s %s", version, fname, why)
        if self.metrics is not None:
            self.metrics.model_load_failures.inc()
        try:
            self.store.record_event(
                "model_load_refused", f"model version {version}: {fname} {why}", {"version": version, "file": fname}
            )
        except Exception:  # the refusal must surface even if the store is down
            log.exception("could not record the refusal of %s", version)

    def load_state(self, version: str) -> dict[str, torch.Tensor]:
        return self._load_file(self.verify(version), WEIGHTS)

    def load_tensors(self, version: str, name: str) -> dict[str, torch.Tensor] | None:
        m = self.verify(version)
        fname = f"{name}.safetensors"
        return self._load_file(m, fname) if fname in m.files else None

    def _load_file(self, m: Manifest, fname: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self._dir(m.version) / fname))

    def load_model(self, version: str, settings: Settings) -> Classifier:
        """The version's classifier in eval mode, built from its manifest (not the current config)."""
        from continual.models import build_model, load_weights

        m = self.verify(version)
        state = self._load_file(m, WEIGHTS)
        model = build_model(model_settings_for(m, settings, state), weights="none")
        load_weights(model, state, head_key=None, source=f"model version {version}")
        return model.eval()

    # -- champion ---------------------------------------------------------------
    def champion(self) -> str | None:
        with read_tx(self.store.engine) as conn:
            return conn.execute(
                select(champion_history.c.version).order_by(champion_history.c.id.desc()).limit(1)
            ).scalar_one_or_none()

    def promote(self, version: str, *, reason: str, actor: str = "", details: dict | None = None) -> None:
        """Make ``version`` champion: one transaction (history row + statuses). Verifies its files first.

        Promoting the current champion records nothing, so the history's ``previous``
        column always names a different version and rollback always changes the model.
        """
        self.verify(version)
        with write_tx(self.store.engine) as conn:
            current = conn.execute(
                select(champion_history.c.version).order_by(champion_history.c.id.desc()).limit(1)
            ).scalar_one_or_none()
            if current == version:
                return
            self._move_pointer(conn, version, reason=reason, actor=actor, details=details)
        if self.metrics is not None and reason != "rollback":
            self.metrics.promotions.inc()
        log.info("champion <- %s (%s%s)", version, reason, f" by {actor}" if actor else "")

    def rollback(self, *, actor: str = "") -> str:
        """The champion before the current one becomes champion again (reason "rollback")."""
        with write_tx(self.store.engine) as conn:
            row = conn.execute(select(champion_history).order_by(champion_history.c.id.desc()).limit(1)).first()
            if row is None:
                raise NoPreviousChampion("there is no champion to roll back")
            if row.previous is None:
                raise NoPreviousChampion(f"{row.version} is the first champion; there is nothing to roll back to")
            target = row.previous
        self.verify(target)
        with write_tx(self.store.engine) as conn:
            # Re-read inside the write transaction: the pointer may have moved meanwhile.
            current = conn.execute(
                select(champion_history.c.version).order_by(champion_history.c.id.desc()).limit(1)
            ).scalar_one()
            if current != row.version:
                raise NoPreviousChampion(f"the champion changed to {current} while rolling back; try again")
            self._move_pointer(conn, target, reason="rollback", actor=actor, details={"from": current})
        if self.metrics is not None:
            self.metrics.rollbacks.inc()
        log.warning("rolled back champion %s -> %s%s", row.version, target, f" by {actor}" if actor else "")
        return target

    def _move_pointer(self, conn: Any, version: str, *, reason: str, actor: str, details: dict | None) -> None:
        exists = conn.execute(select(model_versions.c.version).where(model_versions.c.version == version)).first()
        if exists is None:
            raise VersionNotFound(version, "not registered in the store")
        previous = conn.execute(
            select(champion_history.c.version).order_by(champion_history.c.id.desc()).limit(1)
        ).scalar_one_or_none()
        conn.execute(
            insert(champion_history).values(
                version=version,
                previous=previous,
                promoted_at=datetime.now(UTC),
                reason=reason,
                actor=actor or "",
                details=details,
            )
        )
        # Test hook: die inside the open transaction (the pointer must stay where it was).
        _crash_point("promote")
        if previous and previous != version:
            conn.execute(update(model_versions).where(model_versions.c.version == previous).values(status="retired"))
        conn.execute(update(model_versions).where(model_versions.c.version == version).values(status="champion"))

    # -- listing ----------------------------------------------------------------
    def versions(self) -> list[dict[str, Any]]:
        with read_tx(self.store.engine) as conn:
            rows = conn.execute(select(model_versions).order_by(model_versions.c.created_at, model_versions.c.version))
            return [dict(r._mapping) for r in rows]

    def history(self) -> list[dict[str, Any]]:
        """Champion history, newest first."""
        with read_tx(self.store.engine) as conn:
            rows = conn.execute(select(champion_history).order_by(champion_history.c.id.desc()))
            return [dict(r._mapping) for r in rows]

    # -- housekeeping -------------------------------------------------------------
    def discard_unfinished(self, *, stale_seconds: float = 3600.0) -> list[str]:
        """Remove temporary version directories left by crashed writers; returns their names.

        A directory from this host is removed when its writer process is gone; one
        from another host (a shared model directory) only once it is ``stale_seconds`` old.
        Complete version directories without a store row (a crash between rename and
        insert) are registered from their manifest, so the work is not lost.
        """
        removed = []
        host = socket.gethostname()
        for path in sorted(self.root.glob(TMP_PREFIX + "*")):
            owner = _TMP_OWNER_RE.search(path.name)
            pid, owner_host = (int(owner.group(1)), owner.group(2)) if owner else (-1, "")
            mine = owner_host == host
            if mine and pid != os.getpid() and process_alive(pid):
                continue
            if not mine and time.time() - path.stat().st_mtime < stale_seconds:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        if removed:
            log.warning("discarded unfinished model versions: %s", ", ".join(removed))
        self._adopt_orphans()
        return removed

    def _adopt_orphans(self) -> None:
        known = {v["version"] for v in self.versions()}
        for path in sorted(self.root.iterdir()):
            if path.name in known or not _VERSION_RE.match(path.name) or not (path / MANIFEST).is_file():
                continue
            try:
                m = self.verify(path.name)
            except ChecksumMismatch:
                continue
            self._insert_row(m, _sha256(path / MANIFEST))
            log.warning("registered model version %s found on disk without a store row", m.version)

    def apply_retention(self, keep_last: int) -> list[str]:
        """Delete all but the newest ``keep_last`` versions, always keeping every past champion."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        with read_tx(self.store.engine) as conn:
            champions = set(conn.execute(select(champion_history.c.version).distinct()).scalars())
        live = [v["version"] for v in self.versions() if v["status"] != "deleted"]
        keep = set(live[-keep_last:]) | champions
        deleted = []
        for version in live:
            if version in keep:
                continue
            path = self.root / version
            if path.exists():
                # Rename first so a half-deleted directory never looks like a version.
                trash = self.root / f"{TMP_PREFIX}deleted-{version}-{os.getpid()}@{socket.gethostname()}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            with write_tx(self.store.engine) as conn:
                conn.execute(update(model_versions).where(model_versions.c.version == version).values(status="deleted"))
            deleted.append(version)
        if deleted:
            log.info("retention deleted model versions: %s", ", ".join(deleted))
        return deleted


def model_settings_for(m: Manifest, settings: Settings, state: Mapping[str, torch.Tensor] | None = None) -> Any:
    """The configured model settings with the version's own architecture, classes and input spec.

    With ``state``, an ``mlp``'s hidden sizes come from its weights, so a version
    still loads after ``[model] hidden`` changed.
    """
    from continual.config import InputSettings
    from continual.models.zoo import mlp_hidden_of

    update: dict[str, Any] = {
        "architecture": m.architecture,
        "classes": tuple(m.classes),
        "input": InputSettings.model_validate(m.input),
        "weights": "none",
    }
    if state is not None and m.architecture == "mlp":
        update["hidden"] = mlp_hidden_of(dict(state))
    return settings.model.model_copy(update=update)
