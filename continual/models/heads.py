"""Growing a classifier's head when new classes arrive: old rows kept exactly, new rows initialised.

The class list only ever grows at its end (``[model] classes`` order is part of
the manifest), so an old class keeps its index and its logit: before any
training the grown model scores the old classes exactly as its parent did.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from continual.models.classifier import Classifier

INITS = ("imprint", "random")
# The head's parameter names in a Classifier's state dict: the tensors that gain rows when it grows.
HEAD_KEYS = ("head.weight", "head.bias")


class ClassOrderError(ValueError):
    """The new class list does not start with the old one in the same order."""

    def __init__(self, old_classes: Sequence[str], new_classes: Sequence[str]) -> None:
        self.old_classes, self.new_classes = tuple(old_classes), tuple(new_classes)
        super().__init__(
            f"new_classes must start with the old classes in the same order: old {list(old_classes)}, "
            f"new {list(new_classes)} (a class keeps its index for life; new classes go at the end)"
        )


def added_classes(old_classes: Sequence[str], new_classes: Sequence[str]) -> tuple[str, ...]:
    """The classes ``new_classes`` appends to ``old_classes``; raises :class:`ClassOrderError` otherwise.

    >>> added_classes(["cat", "dog"], ["cat", "dog", "fox"])
    ('fox',)
    """
    old, new = tuple(old_classes), tuple(new_classes)
    if len(set(new)) != len(new):
        dupes = sorted({c for c in new if new.count(c) > 1})
        raise ValueError(f"new_classes has repeated names {dupes}")
    if new[: len(old)] != old:
        raise ClassOrderError(old, new)
    return new[len(old) :]


def grow_head(
    head: nn.Linear,
    old_classes: Sequence[str],
    new_classes: Sequence[str],
    *,
    init: str = "imprint",
    embeddings_by_class: Mapping[str, Tensor] | None = None,
    seed: int = 0,
) -> nn.Linear:
    """A new ``nn.Linear`` with one output per class of ``new_classes``; ``head`` is not modified.

    Rows of the old classes (weight and bias) are copied bit for bit. A new
    class's row is initialised by

    - ``"imprint"`` (the default), centred: with ``mu_k`` the mean embedding of
      class ``k`` and ``m`` the mean of the class means of every class in
      ``embeddings_by_class`` (each new class and at least one old class:
      backbone outputs ``[n, in_features]``), the row is
      ``w_c = s * (mu_c - m) / |mu_c - m|`` with ``s`` the old rows' mean norm,
      and its bias puts its logit at ``m`` level with the old classes' mean
      logit there: ``b_c = mean_k(w_k . m + b_k) - w_c . m``.
    - ``"random"``: ``nn.Linear``'s own initialisation (uniform in ±1/sqrt(in_features)),
      seeded, with zero bias.

    Why imprinting is the default: the new row starts out pointing from the
    middle of the known classes towards the new one, on the old logits' scale,
    so the grown model already tells the new class apart before training and
    the first steps need not drag a random row into place. Why centred, not the
    plain imprint of Qi et al. ("Low-Shot Learning with Imprinted Weights",
    2018: the direction of the class's mean embedding, bias = the old biases'
    mean): after a ReLU every embedding is non-negative, so all of them point
    roughly the same way and an uncentred row scores high on every sample.
    ``bench/classes.py`` (digits, mlp) measured all-class accuracy right after
    growing, tasks 5-6 / 7-9: plain imprint 0.26 / 0.37 (the new classes took
    most old samples), random 0.71 / 0.69, centred 0.85 / 0.81. After training
    (3, 10 or 20 epochs) the three end within noise of each other.

    >>> head = nn.Linear(4, 2)
    >>> emb = {"a": torch.rand(5, 4), "c": torch.rand(3, 4) + 1}
    >>> grown = grow_head(head, ["a", "b"], ["a", "b", "c"], embeddings_by_class=emb)
    >>> grown.out_features, torch.equal(grown.weight[:2], head.weight)
    (3, True)
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if len(old_classes) != head.out_features:
        raise ValueError(f"old_classes has {len(old_classes)} names but the head has {head.out_features} outputs")
    added = added_classes(old_classes, new_classes)
    unknown = sorted(set(embeddings_by_class or ()) - set(new_classes))
    if unknown:
        raise ValueError(f"embeddings_by_class has classes {unknown} that are not in new_classes")
    n_old, dim = head.out_features, head.in_features
    bias = head.bias is not None
    weight = head.weight.detach()
    out = nn.Linear(dim, len(new_classes), bias=bias, device=weight.device, dtype=weight.dtype)
    new_w, new_b = _new_rows(head, added, init, embeddings_by_class, seed)
    with torch.no_grad():
        out.weight[:n_old] = weight
        out.weight[n_old:] = new_w
        if bias:
            out.bias[:n_old] = head.bias.detach()  # type: ignore[union-attr]
            out.bias[n_old:] = new_b
    out.train(head.training)
    out.requires_grad_(head.weight.requires_grad)
    return out


def _new_rows(
    head: nn.Linear,
    added: Sequence[str],
    init: str,
    embeddings_by_class: Mapping[str, Tensor] | None,
    seed: int,
) -> tuple[Tensor, Tensor]:
    weight = head.weight.detach()
    dim, k = head.in_features, len(added)
    if k == 0:
        return weight.new_empty(0, dim), weight.new_empty(0)
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / dim**0.5
        w = (torch.rand(k, dim, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        return w.to(weight), torch.zeros(k, dtype=weight.dtype, device=weight.device)
    if embeddings_by_class is None:
        raise ValueError(
            'init="imprint" needs embeddings_by_class: backbone outputs of each new class and of some old classes'
        )
    old = [c for c in embeddings_by_class if c not in added]
    means: dict[str, Tensor] = {}
    for c in [*added, *old]:
        e = embeddings_by_class.get(c)
        if e is None or e.ndim != 2 or len(e) == 0 or e.shape[1] != dim:
            shape = None if e is None else list(e.shape)
            raise ValueError(f"embeddings_by_class[{c!r}] must be a non-empty [n, {dim}] tensor, got {shape}")
        means[c] = e.detach().to(torch.float64).mean(0).cpu()
    if not old:
        # Centring needs to know what the new class must be told apart from.
        raise ValueError(
            f"embeddings_by_class holds only the new classes {list(added)}; "
            'init="imprint" also needs embeddings of at least one old class (e.g. the replayed samples)'
        )
    w_old = weight.to(torch.float64).cpu()
    b_old = head.bias.detach().to(torch.float64).cpu() if head.bias is not None else torch.zeros(len(w_old))
    # The class-balanced centre: a class with many samples must not pull it towards itself.
    centre = torch.stack(list(means.values())).mean(0)
    scale = w_old.norm(dim=1).mean()
    rows = torch.stack([(means[c] - centre) / (means[c] - centre).norm().clamp_min(1e-12) for c in added]) * scale
    biases = (w_old @ centre + b_old).mean() - rows @ centre
    return rows.to(weight), biases.to(weight)


def grow_classifier(
    model: Classifier,
    new_classes: Sequence[str],
    *,
    init: str = "imprint",
    embeddings_by_class: Mapping[str, Tensor] | None = None,
    seed: int = 0,
) -> Classifier:
    """A copy of ``model`` whose head is grown to ``new_classes`` (see :func:`grow_head`); ``model`` is untouched.

    The backbone is deep-copied (with its ``requires_grad`` flags and train/eval
    mode), so the copy can train while the parent keeps serving or acts as the
    distillation teacher. Before training, the copy's logits for the old
    classes equal the parent's exactly.
    """
    clone = copy.deepcopy(model)
    head = grow_head(
        model.head, model.classes, new_classes, init=init, embeddings_by_class=embeddings_by_class, seed=seed
    )
    grown = Classifier(clone.backbone, head, new_classes, architecture=model.architecture, blocks=clone.blocks())
    grown.train(model.training)
    return grown


def grow_head_tensors(
    tensors: Mapping[str, Tensor], n_classes: int, *, keys: Sequence[str] = HEAD_KEYS, fill: float = 0.0
) -> dict[str, Tensor]:
    """Per-parameter tensors (an EWC Fisher, an anchor) with the head's entries padded to ``n_classes`` rows.

    The old rows keep their values; new rows get ``fill``. For the Fisher this
    is the issue's rule "the old head rows' Fisher carries over; the new rows
    have none" (a zero Fisher puts no penalty on them). Other keys pass through.

    >>> out = grow_head_tensors({"head.bias": torch.ones(2)}, 3)
    >>> out["head.bias"].tolist()
    [1.0, 1.0, 0.0]
    """
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name not in keys:
            out[name] = t
            continue
        if t.ndim == 0 or t.shape[0] > n_classes:
            raise ValueError(f"{name} has shape {list(t.shape)}; cannot grow it to n_classes={n_classes} rows")
        pad = torch.full((n_classes - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        out[name] = torch.cat([t, pad])
    return out
