"""Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models"): prune by weight
magnitude times input norm, per output row, without retraining or weight updates.

The score of weight ``W_ij`` is ``|W_ij| · ‖X_j‖₂``, the norm of input feature ``j`` over the calibration tokens.
Each output row compares only its own weights: unstructured, it loses its ``round(s · in)`` lowest-scored weights;
N:M, each group of M consecutive inputs of a row keeps its N highest-scored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_compress.functional.masks import check_nm, n_pruned, nm_mask


def wanda_scores(weight: Tensor, input_sq_norms: Tensor) -> Tensor:
    """``|W| · ‖X_j‖₂`` for a weight ``(out, in)`` and the per-input sums of squares ``Σ_t x_tj²`` ``(in,)``;
    float32 ``(out, in)``."""
    if weight.dim() != 2 or input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"expected weight (out, in) and input_sq_norms (in,), got {tuple(weight.shape)} and "
            f"{tuple(input_sq_norms.shape)}"
        )
    return weight.detach().abs().float() * input_sq_norms.float().clamp_min(0).sqrt()


def wanda_mask(
    weight: Tensor, input_sq_norms: Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None
) -> Tensor:
    """The Wanda keep-mask of a Linear weight ``(out, in)`` (True: kept).

    Args:
        weight: ``(out, in)``.
        input_sq_norms: ``(in,)`` sums of squares of each input feature over the calibration tokens.
        sparsity: unstructured: the fraction of every row removed (``round(sparsity · in)`` weights per row).
        nm: ``(n, m)``: keep the ``n`` highest scores in each ``m`` consecutive inputs of a row instead
            (``in`` divisible by ``m``); ``sparsity`` is then ignored.

    Returns:
        bool ``(out, in)``; every row has exactly the same number of kept weights.
    """
    scores = wanda_scores(weight, input_sq_norms)
    if nm is not None:
        check_nm(*nm)
        return nm_mask(scores, *nm)
    pruned = n_pruned(scores.shape[1], sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if pruned:
        lowest = torch.topk(scores, pruned, dim=1, largest=False).indices
        mask.scatter_(1, lowest, False)
    return mask
