"""The one collective helper: every cross-rank reduction and broadcast in the library goes through here.

Each call is a no-op without an initialised process group of more than one process, so the same code runs in one
process and under any Lightning strategy built on ``torch.distributed`` (DDP, ``ddp_spawn``, FSDP).

Sharded parameters (FSDP2's ``fully_shard``, which Lightning's ``ModelParallelStrategy`` applies, holds each
parameter, its gradient and its optimizer state as a ``DTensor`` sharded along dim 0): :func:`full_tensor` gives the
whole value on every rank, :func:`local_like` lays a whole tensor (a mask, a snapshot) out as a parameter's shard.
Callback state is kept whole, identical on every rank, so any rank's copy is the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

REDUCE_OPS = ("sum", "mean", "min", "max")


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or the only one)."""
    return not is_distributed() or dist.get_rank() == 0


def world_size() -> int:
    """The number of processes in the running process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """All-reduce ``tensor`` in place across ranks with ``op`` (``"sum"``, ``"mean"``, ``"min"``, ``"max"``).

    ``"mean"`` is the sum divided by the world size (gloo has no average). Returns ``tensor``.

    Raises:
        ValueError: an unknown ``op``.
    """
    if op not in REDUCE_OPS:
        raise ValueError(f"op={op!r} is not supported; allowed: {list(REDUCE_OPS)}")
    if is_distributed():
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=reduce_op.get(op, dist.ReduceOp.MAX))
        if op == "mean":
            tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_many_(tensors: Sequence[Tensor], op: str = "sum") -> None:
    """All-reduce many small tensors in place with one collective: flattened into one float64 buffer, reduced,
    copied back (each in its own dtype). Use for per-step statistics of many layers."""
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    all_reduce_(flat, op)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.reshape(t.shape))


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Broadcast ``tensor`` in place from rank ``src`` so every rank holds identical values; returns ``tensor``.

    Bool tensors travel as uint8 (not every backend broadcasts bool).
    """
    if is_distributed():
        if tensor.dtype == torch.bool:
            carrier = tensor.to(torch.uint8)
            dist.broadcast(carrier, src=src)
            tensor.copy_(carrier.bool())
        else:
            dist.broadcast(tensor, src=src)
    return tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded parameter, gradient or optimizer state of FSDP2)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value of ``tensor``: a ``DTensor`` all-gathered (a collective: call it on every rank, in the same
    order), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (a whole tensor of ``like``'s global shape, identical on every rank) laid out as ``like``.

    For a ``DTensor`` ``like``: a ``DTensor`` on its mesh with its placements, holding this rank's part of ``full``
    (sliced locally, no communication); otherwise ``full`` itself. Element-wise ops between the result and ``like``
    (masking a parameter, its gradient or its optimizer state) then act on this rank's shard only.

    Raises:
        ValueError: ``full``'s shape is not ``like``'s (global) shape.
    """
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"full has shape {tuple(full.shape)}; allowed: the shape of like, {tuple(like.shape)}")
    if isinstance(like, DTensor):
        local = full.to(like.device)
        return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)
    return full


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (pickled: any picklable object; tensors keep the device they had on
    ``src``, so move them to the CPU first under NCCL); ``value`` itself without a process group."""
    if not is_distributed():
        return value
    box = [value if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
