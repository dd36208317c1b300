"""Model files on disk: versions written atomically, verified by checksum, loaded, pruned, imported.

A version is ``<root>/<version>/`` with ``weights.safetensors``, optional extra
tensor files (``fisher.safetensors``) and ``manifest.json``, which lists the
sha256 and size of every other file and is written last. The directory is
built under ``<root>/.tmp-<version>-<pid>@<host>``, every file and the directory
are fsynced, and one ``rename`` publishes it: a directory without a manifest
never exists under a version name, and a file whose checksum does not match
its manifest is never loaded.

Rows live in the store (``store.versions``): the version's row, and the champion
pointer, which moves by compare-and-swap. :meth:`Registry.promote` verifies the
files and then moves the pointer; the store refuses a stale expectation.

One module on purpose: writing (temporary name, fsync, rename, manifest last),
verifying, and cleaning up after a crashed writer must agree on one on-disk layout.
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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from continual.config import Settings
from continual.models import Classifier, build_model, load_weights
from continual.models.manifest import Manifest, model_settings_for
from continual.models.weights import file_sha256
from continual.procutil import process_alive
from continual.store import ChampionMoved, NoPreviousChampion, Store, VersionNotFound

__all__ = [
    "ChampionMoved",
    "ChecksumMismatch",
    "Manifest",
    "NoPreviousChampion",
    "Registry",
    "VersionNotFound",
    "new_version_id",
]

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


def new_version_id(now: datetime | None = None) -> str:
    """Sortable by creation time (microseconds), unique by a random suffix."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S.%f}-{secrets.token_hex(3)}"


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
    """Model versions under ``root`` plus their rows in the store.

    ``on_refused(version)`` runs whenever a version's files fail verification (the
    service counts it in ``continual_model_load_failures_total``).
    """

    def __init__(self, root: Path, store: Store, *, on_refused: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.store = store
        self.on_refused = on_refused
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
                files[fname] = {"sha256": file_sha256(tmp / fname), "size": (tmp / fname).stat().st_size}
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
        self._add_row(manifest, hashlib.sha256(raw).hexdigest())
        _crash_point("insert")
        log.info("wrote model version %s (%s, parent %s, cutoff %d)", version, architecture, parent, data_cutoff)
        return manifest

    def _add_row(self, m: Manifest, manifest_sha: str) -> None:
        # False: another process adopted it first (see discard_unfinished).
        self.store.versions.add(
            version=m.version,
            parent=m.parent,
            architecture=m.architecture,
            created_at=datetime.fromisoformat(m.created_at),
            data_cutoff=m.data_cutoff,
            run_id=m.run_id,
            metrics=m.metrics,
            manifest_sha256=manifest_sha,
            classes=m.classes,
        )

    def import_model(
        self,
        model: Classifier,
        *,
        input_spec: Mapping[str, Any],
        data_cutoff: int = 0,
        promote: bool = True,
        actor: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Register a model built outside the loop (a file, a notebook) and, by default, make it champion."""
        manifest = self.write_version(
            model.state_dict(),
            architecture=model.architecture,
            classes=model.classes,
            input_spec=input_spec,
            parent=None,
            data_cutoff=data_cutoff,
            extra=extra,
        )
        if promote:
            self.promote(
                manifest.version,
                expected=self.store.versions.champion_version(),
                reason="import",
                actor=actor,
                details=dict(extra or {}),
            )
        return manifest

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
        expected = self.store.versions.manifest_sha256(version)
        if expected:
            actual = file_sha256(self._dir(version) / MANIFEST)
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
            digest = file_sha256(path)
            if digest != meta["sha256"]:
                self._refused(version, fname, f"sha256 {digest} != {meta['sha256']}")
                raise ChecksumMismatch(version, fname, meta["sha256"], digest)
        return m

    def _refused(self, version: str, fname: str, why: str) -> None:
        log.error("refusing model version %s: %s %s", version, fname, why)
        if self.on_refused is not None:
            self.on_refused(version)
        try:
            self.store.records.add_event(
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
        m = self.verify(version)
        state = self._load_file(m, WEIGHTS)
        model = build_model(model_settings_for(m, settings, state), weights="none")
        load_weights(model, state, head_key=None, source=f"model version {version}")
        return model.eval()

    # -- the champion pointer (rows in store.versions) -------------------------------------
    def promote(
        self,
        version: str,
        *,
        expected: str | None,
        reason: str,
        actor: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Verify ``version``'s files, then move the champion to it if it is still ``expected``.

        False when ``version`` is champion already (nothing recorded). Raises
        :class:`ChecksumMismatch`/:class:`VersionNotFound` for a version that cannot be
        served, :class:`ChampionMoved` when the champion is no longer ``expected``.
        """
        self.verify(version)
        moved = self.store.versions.move(
            version,
            expected=expected,
            reason=reason,
            actor=actor,
            details=details,
            # Test hook: die inside the open transaction (the pointer must stay where it was).
            during=lambda: _crash_point("promote"),
        )
        if moved:
            log.info("champion <- %s (%s%s)", version, reason, f" by {actor}" if actor else "")
        return moved

    def rollback(self, *, actor: str = "") -> tuple[str, str]:
        """The champion before the current one becomes champion again (reason "rollback"); returns (from, to).

        Two rollbacks in a row toggle back: the second one's "previous" is the first one's champion.
        """
        current = self.store.versions.champion()
        if current is None:
            raise NoPreviousChampion("there is no champion to roll back")
        if current.previous is None:
            raise NoPreviousChampion(f"{current.version} is the first champion; there is nothing to roll back to")
        self.promote(
            current.previous,
            expected=current.version,
            reason="rollback",
            actor=actor,
            details={"from": current.version},
        )
        log.warning(
            "rolled back champion %s -> %s%s", current.version, current.previous, f" by {actor}" if actor else ""
        )
        return current.version, current.previous

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
        known = self.store.versions.names()
        for path in sorted(self.root.iterdir()):
            if path.name in known or not _VERSION_RE.match(path.name) or not (path / MANIFEST).is_file():
                continue
            try:
                m = self.verify(path.name)
            except ChecksumMismatch:
                continue
            self._add_row(m, file_sha256(path / MANIFEST))
            log.warning("registered model version %s found on disk without a store row", m.version)

    def apply_retention(self, keep_last: int) -> list[str]:
        """Delete all but the newest ``keep_last`` versions, always keeping every past champion."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        champions = self.store.versions.past_champions()
        live = [v["version"] for v in self.store.versions.rows() if v["status"] != "deleted"]
        keep = set(live[-keep_last:]) | champions
        # Rows first, files after: the store refuses to mark a version that became champion
        # since the listing above, and refuses to promote one it marked (see Versions.mark_deleted).
        deleted = self.store.versions.mark_deleted([v for v in live if v not in keep])
        for version in deleted:
            path = self.root / version
            if path.exists():
                # Rename first so a half-deleted directory never looks like a version.
                trash = self.root / f"{TMP_PREFIX}deleted-{version}-{os.getpid()}@{socket.gethostname()}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
        if deleted:
            log.info("retention deleted model versions: %s", ", ".join(deleted))
        return deleted
