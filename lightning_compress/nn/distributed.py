"""Collectives across data-parallel ranks, each a no-op without an initialised process group."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """All-reduce ``tensor`` in place across data-parallel ranks (``"sum"`` or ``"max"``); a no-op without DDP."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Broadcast ``tensor`` in place from rank ``src`` so every rank holds identical values; a no-op without DDP."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor
