"""The text stream for ``bench/classes.py --text``: Debian descriptions as frozen MiniLM sentence embeddings.

Each description (``continual/demo/debian.py``: ``apt-cache dumpavail``, class = archive section) is embedded
once by the service's own text path -- ``build_model`` with ``architecture = "minilm"``,
``mode = "feature_extraction"`` (the pinned all-MiniLM-L6-v2, frozen) and ``embed_rows`` (tokenizer ->
encoder -> attention-masked mean of the token states, 384 numbers), as ``bench/text.py`` does -- and cached
in a temporary ``.npy`` keyed by the texts and the model file's hash. These vectors are what a
``feature_extraction`` text model's head sees, so the class-incremental runs over them (``kind = "vector"``
into the MLP head, through ``execute_run``) measure the head the service trains over frozen sentence
embeddings; the encoder itself never changes in that mode.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from continual.demo.debian import CLASSES, Package, packages, stable_order

SELECT_SEED = 0


@dataclass(frozen=True)
class _Row:  # what embed_rows reads of a stored sample
    seq: int
    external_id: str
    kind: str
    payload: bytes
    sha256: str


def select(pkgs: list[Package], per_section: int, seed: int = SELECT_SEED) -> list[Package]:
    """The first ``per_section`` packages of each section in a name-hash order (apps and support packages alike)."""
    out: list[Package] = []
    for section in CLASSES:
        out += stable_order([p for p in pkgs if p.section == section], seed)[:per_section]
    return out


def embed(texts: list[str], cache_dir: Path | None = None) -> tuple[np.ndarray, bool]:
    """``[N, 384]`` float32 mean-pooled MiniLM embeddings (service's feature-extraction path); True if cached."""
    from continual.config import settings_from_dict
    from continual.models import build_model
    from continual.models.features import embed_rows
    from continual.models.text import MINILM_SHA256

    key = hashlib.sha256("\n\0".join([MINILM_SHA256, *texts]).encode("utf-8")).hexdigest()[:16]
    path = (cache_dir or Path(tempfile.gettempdir())) / f"continual-classes-text-{key}.npy"
    if path.is_file():
        return np.load(path), True
    with tempfile.TemporaryDirectory(prefix="continual-classes-text-") as tmp:
        settings = settings_from_dict(
            {
                "service": {"data_dir": tmp},
                "store": {"url": f"sqlite:///{Path(tmp) / 'store.db'}"},
                "model": {"architecture": "minilm", "weights": "pretrained", "mode": "feature_extraction",
                          "classes": list(CLASSES), "input": {"kind": "text"}},
            }
        )  # fmt: skip
        model = build_model(settings.model).eval()
        rows = []
        for i, t in enumerate(texts):
            payload = t.encode("utf-8")
            rows.append(_Row(i, f"t{i}", "text", payload, hashlib.sha256(payload).hexdigest()))
        x = embed_rows(model, rows, spec=settings.model.input, batch_size=64)
    tmp_path = path.with_suffix(".tmp.npy")
    np.save(tmp_path, x)
    tmp_path.replace(path)
    return x, False


def text_vectors(per_section: int) -> tuple[np.ndarray, np.ndarray, list[Package], bool]:
    """(embeddings [N, 384], section index per row into ``CLASSES``, the packages, read from the cache).

    :class:`~continual.demo.debian.NoAptLists` without apt lists.
    """
    chosen = select(packages(), per_section)
    x, cached = embed([p.text for p in chosen])
    y = np.array([CLASSES.index(p.section) for p in chosen], dtype=np.int64)
    return x, y, chosen, cached
