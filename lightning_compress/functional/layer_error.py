"""The layer-output error GPTQ and SparseGPT are expected to leave, in closed form, without running them.

GPTQ (Frantar et al. 2023) solves a weight row column by column; with ``H + λI = R Rᵀ``, ``R`` upper triangular
(``U = R⁻¹`` is the paper's ``Cholesky(H⁻¹)ᵀ``), column ``j`` adds ``δ_j² R_jj²`` to the row's error
``‖(w − q) X‖²`` (``H = XᵀX``), where ``δ_j`` is the rounding error of the column's updated weight. Rounding errors
spread evenly over a step ``Δ`` have mean square ``Δ²/12``; weights pushed past the grid's range are clamped as
well, which round-to-nearest of the block (``ε² = mean (w − RTN(w))²``) shows. So a row is expected to end at

    E_o ≈ Σ_j R_jj² · max(Δ_{o,j}² / 12, ε_{o,j}²)     (columns in GPTQ's order: descending diag(H), act order)

SparseGPT (Frantar & Alistarh 2023) likewise pays ``w_j² R_jj²`` for each weight it drops (the OBS cost), keeping
in each group of ``M`` the ``N`` of largest ``w² R_jj²``. Both need one Cholesky factor per layer and column order,
shared by every bit width, so a search over options costs a few matrix factorisations instead of a solve each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_compress.functional.quant import compute_qparams, fake_quantize

ESTIMATE_CLIP_GRID = 25  # the clipping search's shrink steps: 1, 0.96, ..., 0.24 (GPTQ's own: 1, 0.99, ..., 0.21)


def column_costs(hessian: Tensor, act_order: bool, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """``R_jj²`` of ``H + λI = R Rᵀ`` (``R`` upper triangular, ``λ = percdamp · mean diag H``) in the solver's column
    order, and that order. Shapes: ``hessian (in, in)`` -> ``(in,)`` float64, ``(in,)`` long.

    ``R`` is the reversed lower Cholesky factor of the reversed matrix: ``R = J chol(J H J) J``.
    """
    h = hessian.to(torch.float64)
    n = h.shape[0]
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    h = h[order][:, order]
    dead = h.diagonal() == 0  # a column never seen: GPTQ sets its diagonal to 1
    h[dead, dead] = 1.0
    h = h + percdamp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=h.device)
    lower = torch.linalg.cholesky(h.flip(0, 1))
    return lower.diagonal().flip(0).pow(2), order


def expected_error(
    weight: Tensor,
    hessian: Tensor,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    nm: tuple[int, int] | None = None,
    act_order: bool = True,
    clip_search: bool = True,
    percdamp: float = 0.01,
) -> Tensor:
    """Each row's expected ``‖(w − ŵ) X‖²`` after SparseGPT (with ``nm``) and / or GPTQ (with ``bits``): ``(out,)``
    float64 for a ``(out, in)`` weight and its ``(in, in)`` Hessian ``XᵀX`` (GPTQ's ``2XᵀX`` halves it).

    The grid is the one GPTQ uses (:func:`~lightning_compress.functional.quant.compute_qparams`), with the clipping
    search when ``clip_search`` at 2-4 bits, where it matters, on a 4× coarser grid of shrink factors. On SmolLM2's
    layers the estimate is 0.8-1.3× the solved error at 3 bits, 1.0-1.5× at 4 and 0.3-1.0× at 2 (the 2-bit solve
    clamps more than round-to-nearest shows); 0.7-1.0× for 2:4. The N:M mask is SparseGPT's first choice, made on
    the original weights. Weights the mask drops pay their OBS cost, the kept ones their rounding noise; N:M layers
    keep their natural column order (SparseGPT has no act order).
    """
    out, width = weight.shape
    cost, order = column_costs(hessian, act_order and nm is None, percdamp)
    w = weight.to(torch.float64)[:, order]
    error = torch.zeros(out, dtype=torch.float64, device=weight.device)
    kept = torch.ones_like(w, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        saliency = (w.pow(2) * cost).reshape(out, width // m, m)
        dropped = torch.zeros_like(saliency, dtype=torch.bool)
        dropped.scatter_(-1, saliency.argsort(dim=-1)[..., : m - n], True)
        error += (saliency * dropped).sum(dim=(1, 2))
        kept = ~dropped.reshape(out, width)
    if bits is not None:
        clip = clip_search and bits <= 4
        qp = compute_qparams(weight.float(), bits, symmetric, axis=None if group_size else 0, group_size=group_size,
                             clip_search=clip, clip_grid=ESTIMATE_CLIP_GRID)  # fmt: skip
        noise = (weight.float() - fake_quantize(weight.float(), qp.scale, qp.zero_point, bits)).double().pow(2)
        blocks = noise.reshape(out, -1, group_size or width).mean(dim=-1)  # each block's RTN error (clamps too)
        noise = torch.maximum(blocks, qp.scale.to(torch.float64).reshape(out, -1).pow(2) / 12)
        noise = noise.repeat_interleave(group_size or width, dim=1)[:, order]
        error += (noise * cost * kept).sum(dim=1)
    return error
