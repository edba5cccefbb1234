"""DistributedDataParallel set-up from torchrun's environment, and batch shards.

``batch_size`` is the *global* batch: every rank draws the same permutation and
augmentation parameters and takes its contiguous shard of each global batch
(:func:`shard_rows`). Rank 0 validates, calibrates, writes checkpoints and logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgederm.runtime.errors import InputError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> DistContext:
    """Single process, an existing process group (tests), or torchrun's environment."""
    import torch
    import torch.distributed as dist

    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu (or auto)")
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local = 0, 1, 0
    device = "cpu"
    if use_cuda:
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    return DistContext(rank, world, local, device, owns)


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Positions of rank ``rank``'s contiguous shard within a global batch of ``n``."""
    return np.array_split(np.arange(n), world)[rank]


def global_mean_loss(weighted_sum: Any, global_n: int, ctx: DistContext) -> float:
    """The global batch's mean loss from each rank's loss sum."""
    if ctx.world > 1:
        import torch.distributed as dist

        total = weighted_sum.clone()
        dist.all_reduce(total)
        return float(total) / global_n
    return float(weighted_sum) / global_n


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group this run created (not one the caller set up)."""
    if ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
