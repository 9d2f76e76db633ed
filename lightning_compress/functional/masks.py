"""Pruning masks: unstructured magnitude, N:M semi-structured, and structured (rows, filters, heads).

Every function returns a boolean mask of the weight's shape, ``True`` = keep. Applying it is ``w * mask``.
Ranking uses ``torch.topk`` over exact counts, so the number kept is exact even when magnitudes tie.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate a sparsity: a number in ``[0, 1)``; returns it as float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")
    return float(sparsity)


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse an ``"N:M"`` pattern such as ``"2:4"`` into ``(N, M)`` with ``0 < N < M``."""
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (AttributeError, ValueError):
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    check_nm(n, m)
    return n, m


def check_nm(n: int, m: int) -> None:
    """Validate an N:M pattern: integers with ``0 < N < M``."""
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ValueError(f"an N:M pattern needs integers 0 < N < M, got N={n!r}, M={m!r}")


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity removes: ``round(sparsity * numel)``."""
    return int(round(check_sparsity(sparsity) * numel))


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of ``scores``' shape keeping exactly its ``k`` largest entries."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Unstructured magnitude mask: keep the ``numel - round(sparsity * numel)`` largest ``|w|``.

    Example: ``w = [5.0, 0.3, -0.4, -2.1, 0.01, 1.7]`` at sparsity 0.5 keeps ``5.0, -2.1, 1.7``.

    Args:
        weight: any shape.
        sparsity: fraction to remove, in ``[0, 1)``.

    Returns:
        bool mask of ``weight``'s shape.
    """
    k = weight.numel() - n_pruned(weight.numel(), sparsity)
    return topk_mask(weight.detach().abs(), k)


def global_magnitude_masks(weights: list[Tensor], sparsity: float) -> list[Tensor]:
    """Magnitude masks ranked over several tensors at once (one global threshold, Han et al. 2015).

    Args:
        weights: tensors of any shapes.
        sparsity: fraction of all their weights to remove, in ``[0, 1)``.

    Returns:
        One bool mask per tensor; together they keep exactly ``total - round(sparsity * total)`` weights.
    """
    if not weights:
        raise ValueError("weights must hold at least one tensor")
    scores = torch.cat([w.detach().abs().reshape(-1).float() for w in weights])
    keep = topk_mask(scores, scores.numel() - n_pruned(scores.numel(), sparsity))
    sizes = [w.numel() for w in weights]
    return [m.view_as(w) for m, w in zip(keep.split(sizes), weights, strict=True)]


def _inputs_last(weight: Tensor) -> Tensor:
    """Move the input dimension (dim 1) last: ``(out, in, *k) -> (out, *k, in)``; 2-D stays as is."""
    return weight if weight.dim() == 2 else weight.movedim(1, -1)


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M mask: in every M consecutive weights along the input dimension keep the N largest ``|w|``.

    For a Linear ``(out, in)`` the groups run along ``in``; for a conv ``(out, in, kh, kw)`` along the input
    channels at each kernel position (as NVIDIA's ASP does), which is the layout sparse tensor cores need.

    Args:
        weight: ``(out, in, ...)`` with ``in`` divisible by ``m``.
        n, m: the pattern, ``0 < n < m`` (2:4 by default: 50% sparsity).

    Returns:
        bool mask of ``weight``'s shape with exactly ``n`` True in each group.
    """
    check_nm(n, m)
    if weight.dim() < 2:
        raise ValueError(
            f"an N:M mask needs a weight of at least 2 dims (out, in, ...), got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] % m:
        raise ValueError(
            f"the input dimension {weight.shape[1]} of shape {tuple(weight.shape)} is not divisible by M={m}"
        )
    moved = _inputs_last(weight.detach().abs())
    groups = moved.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1, sorted=False).indices, True)
    keep = keep.reshape(moved.shape)
    return keep if weight.dim() == 2 else keep.movedim(-1, 1)


def row_scores(weight: Tensor) -> Tensor:
    """L1 norm of each output row / conv filter: ``s_i = sum_j |w_ij|``, shape ``(out,)``."""
    return weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1)


def row_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Structured mask removing whole output rows (Linear) or filters (conv) with the smallest L1 norm.

    Args:
        weight: ``(out, ...)``.
        sparsity: fraction of rows to remove, in ``[0, 1)``; ``round(sparsity * out)`` rows go.

    Returns:
        bool mask of ``weight``'s shape, constant along every dim but 0.
    """
    keep_rows = topk_mask(row_scores(weight), weight.shape[0] - n_pruned(weight.shape[0], sparsity))
    return keep_rows.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


def head_mask(weight: Tensor, head_size: int, sparsity: float, dim: int = 0) -> Tensor:
    """Structured mask removing whole attention heads with the smallest L1 norm.

    Heads are blocks of ``head_size`` consecutive indices along ``dim``: rows (``dim=0``) of a query / key /
    value projection ``(heads * head_size, hidden)``, or columns (``dim=1``) of the output projection
    ``(hidden, heads * head_size)``. Head score: ``sum |w|`` over the block.

    Args:
        weight: a 2-D projection weight.
        head_size: features per head; must divide ``weight.shape[dim]``.
        sparsity: fraction of heads to remove, in ``[0, 1)``.
        dim: 0 for q/k/v (heads are output rows), 1 for the output projection (heads are input columns).

    Returns:
        bool mask of ``weight``'s shape.
    """
    if weight.dim() != 2 or dim not in (0, 1):
        raise ValueError(f"head_mask needs a 2-D weight and dim 0 or 1, got shape {tuple(weight.shape)}, dim={dim}")
    size = weight.shape[dim]
    if not isinstance(head_size, int) or head_size < 1 or size % head_size:
        raise ValueError(f"head_size={head_size!r} must be a positive divisor of {size} (dim {dim} of the weight)")
    heads = size // head_size
    blocks = weight.detach().abs().movedim(dim, 0).reshape(heads, -1)
    keep_heads = topk_mask(blocks.sum(dim=1), heads - n_pruned(heads, sparsity))
    keep = keep_heads.repeat_interleave(head_size)
    shape = (-1, 1) if dim == 0 else (1, -1)
    return keep.view(shape).expand_as(weight).clone()
