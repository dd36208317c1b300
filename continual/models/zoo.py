"""Architectures by name: torchvision models, EfficientNet-Lite0, a small MLP, or a user factory.

Every builder returns a backbone whose output is the embedding the original
classifier head consumed; :func:`build_model` puts a fresh head sized to the
configured classes on top of it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from continual.config import ModelSettings
from continual.models.classifier import Classifier
from continual.models.text import minilm_parts
from continual.models.transforms import input_shape
from continual.models.weights import (
    ModelError,
    UnknownArchitecture,
    WeightsFileError,
    efficientnet_lite0_file,
    read_state_dict,
    torchvision_weights_file,
)

BUILTIN = ("mlp", "minilm", "efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0")


# [model] weights values that mean "the architecture's own pretrained weights" (ImageNet for images).
PRETRAINED = ("imagenet", "pretrained")


@dataclass
class _Parts:
    backbone: nn.Module
    dim: int
    blocks: list[nn.Module]
    head_key: str | None = None  # where the original head sat inside the backbone ("fc", "classifier.3", ...)
    original_head: nn.Linear | None = None


def build_model(model: ModelSettings, *, weights: str | None = None) -> Classifier:
    """A classifier for ``model``; ``weights`` ("imagenet" | "none" | a file) overrides ``model.weights``.

    "imagenet" loads the pretrained backbone and puts a new head sized to
    ``model.classes`` on it. A file holds a whole classifier: either this
    package's own state dict (``backbone.*``, ``head.*``, as the registry writes
    it) or the plain architecture's state dict with its own head resized to the
    classes (e.g. a torchvision ``resnet18`` whose ``fc`` has one output per class).
    """
    weights = model.weights if weights is None else weights
    pretrained = weights in PRETRAINED
    parts = _parts(model, pretrained=pretrained)
    head = nn.Linear(parts.dim, len(model.classes))
    clf = Classifier(parts.backbone, head, model.classes, architecture=model.architecture, blocks=parts.blocks)
    if not pretrained and weights != "none":
        load_weights(clf, read_state_dict(weights), head_key=parts.head_key, source=weights)
    return clf


def imagenet_model(architecture: str, *, download: bool = True) -> Classifier:
    """A pretrained image architecture with its original 1000-class ImageNet head."""
    settings = ModelSettings(architecture=architecture, download_weights=download)
    parts = _parts(settings, pretrained=True)
    if parts.original_head is None:
        raise ModelError(f"{architecture} has no ImageNet head")
    return Classifier(
        parts.backbone, parts.original_head, imagenet_categories(), architecture=architecture, blocks=parts.blocks
    )


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names in index order (daisy is 985)."""
    import torchvision

    return tuple(torchvision.models.get_model_weights("resnet18").DEFAULT.meta["categories"])


def load_weights(clf: Classifier, state: dict[str, torch.Tensor], *, head_key: str | None, source: str) -> None:
    """Load a whole-classifier state dict, naming every key or shape that does not fit."""
    if not all(k.startswith(("backbone.", "head.")) for k in state):
        state = {_map_plain_key(k, head_key): v for k, v in state.items()}
    expected = clf.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if "head.weight" in state and state["head.weight"].shape[0] != len(clf.classes):
        problems.append(
            f"the file's head has {state['head.weight'].shape[0]} classes, [model] classes has {len(clf.classes)}"
        )
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"shape mismatch {shapes[:4]}")
    if problems:
        raise WeightsFileError(source, f"does not fit architecture {clf.architecture}: " + "; ".join(problems))
    clf.load_state_dict(state)


def mlp_hidden_of(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The hidden sizes of an ``mlp`` classifier, read from its state dict (manifests need not repeat them)."""
    sizes = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "backbone" and parts[2] == "0" and parts[3] == "weight":
            sizes[int(parts[1])] = int(value.shape[0])
    return tuple(sizes[i] for i in sorted(sizes))


def _map_plain_key(key: str, head_key: str | None) -> str:
    if head_key and key.startswith(head_key + "."):
        return "head." + key[len(head_key) + 1 :]
    return "backbone." + key


def _parts(model: ModelSettings, *, pretrained: bool) -> _Parts:
    arch = model.architecture
    if arch == "mlp":
        _no_imagenet(arch, pretrained)
        return _mlp(model)
    if ":" in arch:
        _no_imagenet(arch, pretrained)
        return _user_factory(model)
    if arch == "minilm":
        backbone, blocks = minilm_parts(model.input, pretrained=pretrained)
        return _Parts(backbone, backbone.embedding_dim, blocks)
    if arch == "efficientnet_lite0":
        _needs_rgb(model)
        return _efficientnet_lite0(pretrained)
    if arch in _torchvision_names():
        _needs_rgb(model)
        return _torchvision(model, pretrained)
    raise UnknownArchitecture(arch, list(BUILTIN))


def _no_imagenet(arch: str, pretrained: bool) -> None:
    if pretrained:
        raise ModelError(f'architecture {arch!r} has no ImageNet weights: set [model] weights = "none" or a file path')


def _needs_rgb(model: ModelSettings) -> None:
    spec = model.input
    if spec.kind != "image" or spec.channels != 3:
        raise ModelError(
            f'{model.architecture} takes RGB images: set [model.input] kind = "image" and channels = 3 '
            f"(got kind = {spec.kind!r}, channels = {spec.channels}); grey images are converted to RGB"
        )


@cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _torchvision(model: ModelSettings, pretrained: bool) -> _Parts:
    import torchvision

    net = torchvision.models.get_model(model.architecture, weights=None)
    if pretrained:
        path = torchvision_weights_file(model.architecture, download=model.download_weights)
        net.load_state_dict(read_state_dict(path))
    head_key, head = _cut_last_linear(net)
    return _Parts(net, head.in_features, _stages(net), head_key, head)


def _efficientnet_lite0(pretrained: bool) -> _Parts:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None: "same" padding computed per input, so any [model.input] size works.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        net.load_state_dict(read_state_dict(efficientnet_lite0_file()))
    head_key, head = _cut_last_linear(net)
    blocks = [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]
    return _Parts(net, head.in_features, blocks, head_key, head)


def _mlp(model: ModelSettings) -> _Parts:
    n_in = 1
    for d in input_shape(model.input):
        n_in *= d
    blocks: list[nn.Module] = []
    width = n_in
    for h in model.hidden:
        blocks.append(nn.Sequential(nn.Linear(width, h), nn.ReLU()))
        width = h
    return _Parts(nn.Sequential(nn.Flatten(), *blocks), width, blocks)


def _user_factory(model: ModelSettings) -> _Parts:
    """``"package.module:function"``: ``function(model: ModelSettings) -> nn.Module``.

    The returned module is the backbone: it maps an input batch (shaped by
    ``[model.input]``) to embeddings ``[N, D]``. ``D`` is read from an
    ``embedding_dim`` attribute or found with one forward pass on zeros; the
    stages for fine-tuning come from a ``blocks()`` method if it has one, else its
    top-level children that hold parameters. The head is added by the service.
    """
    spec = model.architecture
    module_name, _, func_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"architecture {spec!r}: cannot import {func_name!r} from {module_name!r} ({e})") from None
    backbone = factory(model)
    if not isinstance(backbone, nn.Module):
        raise ModelError(f"architecture {spec!r}: the factory returned {type(backbone).__name__}, not an nn.Module")
    dim = getattr(backbone, "embedding_dim", None)
    if not isinstance(dim, int):
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            # Text backbones take int64 token ids and masks (continual.models.text); zeros are [PAD].
            dtype = torch.long if model.input.kind == "text" else torch.float32
            out = backbone(torch.zeros(2, *input_shape(model.input), dtype=dtype))
        backbone.train(was_training)
        if out.ndim != 2:
            raise ModelError(
                f"architecture {spec!r}: the backbone must return [N, D] embeddings, got {list(out.shape)}"
            )
        dim = int(out.shape[1])
    blocks_fn = getattr(backbone, "blocks", None)
    blocks = list(blocks_fn()) if callable(blocks_fn) else _stages(backbone)
    return _Parts(backbone, dim, blocks)


def _cut_last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    """Replace the last ``nn.Linear`` (the classifier head) by ``nn.Identity``; return its path and itself."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(net).__name__} has no linear classifier head to replace")
    name, head = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, nn.Identity())
    return name, head


def _stages(net: nn.Module) -> list[nn.Module]:
    """Backbone stages in input-to-output order."""
    if hasattr(net, "layer1"):  # the ResNet family: stem, layer1..layer4
        stem = nn.ModuleList([m for n, m in net.named_children() if n in ("conv1", "bn1")])
        return [stem, *[getattr(net, f"layer{i}") for i in range(1, 5) if hasattr(net, f"layer{i}")]]
    out: list[nn.Module] = []
    for name, child in net.named_children():
        if name == "features" and isinstance(child, nn.Sequential):
            out.extend(child.children())
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out
