from __future__ import annotations

import pytest
import torch
from torch import nn

from continual.config import InputSettings, ModelSettings
from continual.models import apply_mode, build_model
from continual.models.heads import ClassOrderError, added_classes, grow_classifier, grow_head, grow_head_tensors

OLD = ("a", "b", "c")
NEW = ("a", "b", "c", "d", "e")


def head(seed: int = 0, dim: int = 6, n: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dim, n)


def embeddings(seed: int = 1, dim: int = 6) -> dict[str, torch.Tensor]:
    """Non-negative (post-ReLU-like) embeddings of two old and two new classes, each around its own centre."""
    g = torch.Generator().manual_seed(seed)
    return {
        c: torch.rand(n, dim, generator=g) + 2 * torch.eye(dim)[i]
        for i, (c, n) in enumerate(zip("abde", (4, 6, 5, 7), strict=True))
    }


def mlp(classes: tuple[str, ...] = OLD) -> ModelSettings:
    return ModelSettings(
        architecture="mlp",
        weights="none",
        mode="all",
        classes=classes,
        hidden=(8,),
        input=InputSettings(kind="vector", shape=(6,)),
    )


@pytest.mark.parametrize("init", ["imprint", "random"])
def test_old_rows_are_copied_bit_for_bit_and_the_parent_is_untouched(init: str) -> None:
    h = head()
    before = {k: v.clone() for k, v in h.state_dict().items()}
    grown = grow_head(h, OLD, NEW, init=init, embeddings_by_class=embeddings())
    assert (grown.in_features, grown.out_features) == (6, 5)
    assert torch.equal(grown.weight[:3], h.weight) and torch.equal(grown.bias[:3], h.bias)
    assert all(torch.equal(before[k], v) for k, v in h.state_dict().items())
    assert grown.weight.data_ptr() != h.weight.data_ptr()
    assert torch.isfinite(grown.weight).all() and grown.weight.requires_grad


def test_imprinted_rows_point_from_the_centre_to_the_class_at_the_old_rows_scale() -> None:
    h, emb = head(), embeddings()
    grown = grow_head(h, OLD, NEW, init="imprint", embeddings_by_class=emb)
    w, b = h.weight.detach().double(), h.bias.detach().double()
    means = {c: e.double().mean(0) for c, e in emb.items()}
    centre = torch.stack(list(means.values())).mean(0)
    for i, c in enumerate(("d", "e"), start=3):
        direction = (means[c] - centre) / (means[c] - centre).norm()
        row = direction * w.norm(dim=1).mean()
        torch.testing.assert_close(grown.weight[i].detach().double(), row, rtol=1e-6, atol=1e-6)
        # At the centre the new logit equals the old classes' mean logit there.
        torch.testing.assert_close(grown(centre.float())[i].double(), (w @ centre + b).mean(), rtol=1e-5, atol=1e-5)
    # Imprinted rows tell the new classes apart before any training; random rows do not need to.
    with torch.no_grad():
        assert grown(emb["d"]).argmax(1).eq(3).all() and grown(emb["e"]).argmax(1).eq(4).all()


def test_imprinting_without_old_embeddings_is_refused() -> None:
    # Centring needs the old classes: a plain (uncentred) imprint of non-negative embeddings scores high everywhere.
    only_new = {c: e for c, e in embeddings().items() if c in "de"}
    with pytest.raises(ValueError, match="also needs embeddings of at least one old class"):
        grow_head(head(), OLD, NEW, embeddings_by_class=only_new)


def test_random_rows_are_seeded_small_and_unbiased() -> None:
    h = head()
    a = grow_head(h, OLD, NEW, init="random", seed=3)
    assert torch.equal(a.weight, grow_head(h, OLD, NEW, init="random", seed=3).weight)
    assert not torch.equal(a.weight[3:], grow_head(h, OLD, NEW, init="random", seed=4).weight[3:])
    assert a.weight[3:].abs().max() <= 1 / 6**0.5 and torch.equal(a.bias[3:], torch.zeros(2))


@pytest.mark.parametrize(
    "new",
    [("b", "a", "c", "d"), ("a", "b", "d"), ("a", "b"), ("x", "a", "b", "c")],
    ids=["reordered", "renamed", "shorter", "prepended"],
)
def test_the_new_list_must_start_with_the_old_one(new: tuple[str, ...]) -> None:
    with pytest.raises(ClassOrderError, match="must start with the old classes"):
        grow_head(head(), OLD, new, init="random")


def test_bad_arguments_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="repeated names \\['d'\\]"):
        added_classes(OLD, (*OLD, "d", "d"))
    with pytest.raises(ValueError, match="init must be one of"):
        grow_head(head(), OLD, NEW, init="zeros")
    with pytest.raises(ValueError, match="needs embeddings_by_class"):
        grow_head(head(), OLD, NEW)
    with pytest.raises(ValueError, match="embeddings_by_class\\['e'\\] must be a non-empty \\[n, 6\\]"):
        grow_head(head(), OLD, NEW, embeddings_by_class={"a": torch.ones(2, 6), "d": torch.ones(2, 6)})
    with pytest.raises(ValueError, match="embeddings_by_class has classes \\['z'\\] that are not in new_classes"):
        grow_head(head(), OLD, NEW, embeddings_by_class={**embeddings(), "z": torch.ones(2, 6)})
    with pytest.raises(ValueError, match="old_classes has 2 names but the head has 3 outputs"):
        grow_head(head(), ("a", "b"), NEW, init="random")


def test_no_new_class_gives_an_equal_copy() -> None:
    h = head()
    same = grow_head(h, OLD, OLD)
    assert torch.equal(same.weight, h.weight) and torch.equal(same.bias, h.bias)


@pytest.mark.parametrize("init", ["imprint", "random"])
def test_grown_classifier_gives_the_parents_old_logits_before_training(init: str) -> None:
    torch.manual_seed(0)
    parent = build_model(mlp()).eval()
    x = torch.randn(32, 6)
    emb = {c: parent.embed(x[i * 4 : i * 4 + 4]).detach() for i, c in enumerate(("a", "d", "e"))}
    child = grow_classifier(parent, NEW, init=init, embeddings_by_class=emb)
    assert child.classes == NEW and child.architecture == "mlp" and not child.training
    with torch.no_grad():
        old, new = parent(x), child(x)
    assert new.shape == (32, 5) and torch.equal(new[:, :3], old)
    # The registry can write the child and build_model(classes=NEW) read it back.
    build_model(mlp(NEW)).load_state_dict(child.state_dict())


def test_training_the_grown_classifier_leaves_the_parent_alone() -> None:
    torch.manual_seed(0)
    parent = build_model(mlp())
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = grow_classifier(parent, NEW, init="random")
    # The child's blocks are its own: freezing them does not freeze the parent's.
    apply_mode(child, "fine_tune", unfreeze_last=0)
    assert all(p.requires_grad for p in parent.parameters())
    assert not any(p.requires_grad for p in child.backbone.parameters())
    apply_mode(child, "all")
    opt = torch.optim.SGD(child.parameters(), lr=0.5)
    nn.functional.cross_entropy(child(torch.randn(8, 6)), torch.tensor([3, 4] * 4)).backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items())
    assert not torch.equal(child.backbone[1][0].weight, parent.backbone[1][0].weight)


def test_head_tensors_keep_their_old_rows_and_new_rows_get_the_fill() -> None:
    fisher = {"head.weight": torch.ones(3, 6), "head.bias": torch.full((3,), 2.0), "backbone.1.0.weight": torch.ones(2)}
    out = grow_head_tensors(fisher, 5)
    assert torch.equal(out["head.weight"], torch.cat([torch.ones(3, 6), torch.zeros(2, 6)]))
    assert out["head.bias"].tolist() == [2.0, 2.0, 2.0, 0.0, 0.0]
    assert out["backbone.1.0.weight"] is fisher["backbone.1.0.weight"]
    with pytest.raises(ValueError, match="cannot grow it to n_classes=2"):
        grow_head_tensors(fisher, 2)
