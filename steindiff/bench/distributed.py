"""Sharding over processes started by ``torchrun`` (one process when not under it).

Each rank takes a strided share of the work and every rank gets what all ranks produced, in rank
order, with PyTorch's own collectives: gloo on the CPU, nccl on CUDA (as NVlabs/edm's scripts do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Shard", "gather", "start", "stop"]


@dataclass(frozen=True)
class Shard:
    """This process's place in the job and the device it computes on."""

    rank: int
    world: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device: str) -> Shard:
    """Join the torchrun job from its environment (``WORLD_SIZE`` > 1), or run alone.

    Under torchrun a CUDA ``device`` becomes ``cuda:<LOCAL_RANK>`` and the backend is nccl; gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard(0, 1, device)
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Shard(rank, world, device)


def gather(obj: Any, shard: Shard) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (objects are pickled between our own processes)."""
    if shard.world == 1:
        return [obj]
    out: list[Any] = [None] * shard.world
    dist.all_gather_object(out, obj)
    return out


def stop(shard: Shard) -> None:
    """Leave the process group (a no-op when alone)."""
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
