"""Several training processes under torchrun: the rank's view, its device and its CPU threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch

from continual.config import Settings
from continual.models.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any_true(self, flag: bool) -> bool:
        """Whether any rank says yes: all ranks stop at the same step, or a collective would hang."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def pick_device(settings: Settings, dist: Dist) -> torch.device:
    device = resolve_device(settings.training.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank % max(1, torch.cuda.device_count()))
    return device


def cpu_threads(settings: Settings, dist: Dist) -> int:
    """``cpu_threads``, else all cores but one (serving keeps a core), shared among the local ranks."""
    n = settings.training.cpu_threads or max(1, (os.cpu_count() or 2) - 1)
    return max(1, n // dist.local_world_size)
