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


def sparsity_or_pattern(
    sparsity: float | None, pattern: str | None, default: float = 0.5
) -> tuple[float, tuple[int, int] | None]:
    """``(sparsity, (n, m) or None)`` from a one-shot pruner's two arguments: an ``"N:M"`` ``pattern`` fixes the
    sparsity at ``1 - N/M`` (``sparsity`` must then stay None); otherwise ``sparsity`` (``default`` when None).

    Raises:
        ValueError / TypeError: a bad pattern or sparsity, or both given.
    """
    if pattern is None:
        return check_sparsity(default if sparsity is None else sparsity), None
    nm = parse_nm(pattern)
    if sparsity is not None:
        raise ValueError(
            f"sparsity={sparsity!r} with pattern={pattern!r}: N:M fixes the sparsity at {1 - nm[0] / nm[1]:g}; "
            "allowed: sparsity unset (None) with a pattern"
        )
    return 1 - nm[0] / nm[1], nm


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


def group_head_masks(parts: list[tuple[Tensor, int]], head_size: int, sparsity: float) -> list[Tensor]:
    """Masks removing the same attention heads from every projection of one attention block.

    Heads are blocks of ``head_size`` consecutive indices along a dim of each part: rows (``dim=0``) of the
    query / key / value projections ``(heads * head_size, hidden)`` and of their biases, columns (``dim=1``) of
    the output projection ``(hidden, heads * head_size)``. A head's score is its L1 norm summed over all parts,
    so one decision removes the head everywhere (pruning q, k, v and the output columns alike).

    Args:
        parts: ``(tensor, dim)`` pairs; every ``tensor.shape[dim]`` must be the same multiple of ``head_size``.
        head_size: features per head.
        sparsity: fraction of heads to remove, in ``[0, 1)``; ``round(sparsity * heads)`` go.

    Returns:
        One bool mask per part, of that part's shape.
    """
    if not parts:
        raise ValueError("parts must hold at least one (tensor, dim) pair")
    sizes = {t.shape[d] if d < t.dim() else -1 for t, d in parts}
    size = sizes.pop()
    if sizes or size < 1:
        raise ValueError(
            f"every part must have the same size along its head dim, got {[tuple(t.shape) for t, _ in parts]}"
        )
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size < 1 or size % head_size:
        raise ValueError(f"head_size={head_size!r} must be a positive divisor of {size}, the heads' dimension")
    heads = size // head_size
    scores = sum(t.detach().abs().movedim(d, 0).reshape(heads, -1).sum(dim=1).float() for t, d in parts)
    keep = topk_mask(scores, heads - n_pruned(heads, sparsity)).repeat_interleave(head_size)
    masks = []
    for t, d in parts:
        shape = [1] * t.dim()
        shape[d] = size
        masks.append(keep.view(shape).expand_as(t).clone())
    return masks


def head_mask(weight: Tensor, head_size: int, sparsity: float, dim: int = 0) -> Tensor:
    """Structured mask removing whole attention heads of one projection weight by L1 norm.

    The one-part case of :func:`group_head_masks`: rows (``dim=0``, q / k / v) or columns (``dim=1``, output
    projection) in blocks of ``head_size``.

    Args:
        weight: a 2-D projection weight.
        head_size: features per head; must divide ``weight.shape[dim]``.
        sparsity: fraction of heads to remove, in ``[0, 1)``.
        dim: 0 for q / k / v (heads are output rows), 1 for the output projection (heads are input columns).

    Returns:
        bool mask of ``weight``'s shape.
    """
    if weight.dim() != 2 or dim not in (0, 1):
        raise ValueError(f"head_mask needs a 2-D weight and dim 0 or 1, got shape {tuple(weight.shape)}, dim={dim}")
    return group_head_masks([(weight, dim)], head_size, sparsity)[0]


def sparsity_pattern(weight: Tensor) -> str:
    """Name the sparsity structure of a weight from its zeros: ``"dense"`` (no zeros), ``"rows"`` (every zero lies in
    an all-zero output row / filter), ``"2:4"`` (at most 2 non-zeros in every 4 consecutive inputs), else
    ``"unstructured"``."""
    w = weight.detach()
    nnz = int(torch.count_nonzero(w))
    if nnz == w.numel():
        return "dense"
    if w.dim() >= 2:
        rows_nnz = torch.count_nonzero(w.reshape(w.shape[0], -1), dim=1)
        if int(rows_nnz.sum()) == int((rows_nnz > 0).sum()) * w[0].numel():
            return "rows"
        if w.shape[1] % 4 == 0 and bool((torch.count_nonzero(_inputs_last(w).reshape(-1, 4), dim=1) <= 2).all()):
            return "2:4"
    return "unstructured"
