"""The one result type every drift detector returns, and the shared decision rule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class DriftResult:
    """Outcome of one two-sample check between a reference and a current window.

    ``statistic`` is the detector's own test statistic, ``p_value`` its
    significance, and ``effect`` a size measure that does not grow with the
    sample size, so one ``min_effect`` threshold means the same thing for
    500 samples and for 50,000.
    """

    detector: str
    statistic: float
    p_value: float
    effect: float
    detected: bool
    n_reference: int
    n_current: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(p_value: float, effect: float, alpha: float, min_effect: float) -> bool:
    # Large windows make every tiny difference "significant"; the effect gate
    # keeps those from raising an alarm nobody should act on.
    return bool(p_value < alpha and effect >= min_effect)


def check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def check_min_effect(min_effect: float) -> None:
    if not (math.isfinite(min_effect) and min_effect >= 0.0):
        raise ValueError(f"min_effect must be a finite number >= 0, got {min_effect!r}")


def resolve_device(device: str | torch.device, *arrays: object) -> torch.device:
    """``"auto"`` follows a CUDA input tensor, else uses CUDA when present, else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    for a in arrays:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            return a.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_matrix(name: str, x: object) -> np.ndarray | torch.Tensor:
    """Validate a window of vectors (rows are samples); 1-D input is one feature."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples x features), got shape {tuple(x.shape)}")
    finite = torch.isfinite(x).all().item() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_windows(reference: object, current: object, min_samples: int = 2) -> tuple[Any, Any]:
    ref = as_matrix("reference", reference)
    cur = as_matrix("current", current)
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]} features but current has {cur.shape[1]}")
    for name, w in (("reference", ref), ("current", cur)):
        if w.shape[0] < min_samples:
            raise ValueError(f"{name} needs at least {min_samples} samples, got {w.shape[0]}")
    return ref, cur
