"""AWQ: activation-aware weight quantization (Lin et al. 2024), the math of one layer group.

AWQ protects the weights that meet large activations: a group of Linears reading one input ``X`` (in,) has its input
channels scaled, ``W diag(s)`` and ``X diag(s)⁻¹`` (the ``1/s`` folded into the module that produces ``X``), with
``s = mean_t|X_tj|^α`` normalised to ``sqrt(max(s) · min(s)) = 1``; ``α ∈ [0, 1]`` is chosen by a grid search that
minimises the output error of the module holding the group (the caller runs it: :func:`scaled_fake_quant` is the
weight it sees). Then each weight group's range is clipped by a second search (:func:`clip_ratios`) minimising the
layer's output error on calibration tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_compress.functional.quant import (
    compute_qparams,
    dequantize,
    expand_params,
    qparams_from_range,
    quantize,
)

# s below this is raised to it (a dead input channel would otherwise get s = 0).
MIN_FACTOR = 1e-4


def awq_factors(act_mean: Tensor, alpha: float) -> Tensor:
    """AWQ's per-input-channel scales ``s = act_mean^α``, normalised so that ``max(s) · min(s) = 1``.

    Args:
        act_mean: ``(in,)`` mean ``|X_j|`` over the calibration tokens.
        alpha: the exponent in ``[0, 1]`` (0: no scaling).

    Returns:
        float32 ``(in,)``, all > 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    s = act_mean.float().clamp(min=MIN_FACTOR).pow(alpha).clamp(min=MIN_FACTOR)
    return s / (s.max() * s.min()).sqrt()


def fake_quant_weight(weight: Tensor, bits: int, group_size: int | None, symmetric: bool) -> Tensor:
    """Round-to-nearest of ``weight (out, in)`` on its min-max grid (per channel, or per group of inputs)."""
    qp = compute_qparams(weight, bits, symmetric, axis=0 if group_size is None else None, group_size=group_size)
    return dequantize(quantize(weight, qp.scale, qp.zero_point, bits), qp.scale, qp.zero_point)


def scaled_fake_quant(weight: Tensor, s: Tensor, bits: int, group_size: int | None, symmetric: bool) -> Tensor:
    """The weight a scaled, quantized layer computes with, in the original input space: ``Q(W diag(s)) diag(s)⁻¹``."""
    return fake_quant_weight(weight * s, bits, group_size, symmetric) / s


def clip_ratios(
    weight: Tensor,
    x: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """AWQ's weight-clipping search: per output row and weight group, the ratio ``r`` of the range ``[r·min, r·max]``
    (``r = 1, 1 - 1/grid, ...`` down to ``1 - max_shrink``) with the least ``Σ_t (x_t,g · (w_g - Q_r(w_g)))²``, the
    group's contribution to the layer's output error over the tokens ``x`` (ties: the larger ``r``).

    Args:
        weight: ``(out, in)``.
        x: ``(tokens, in)`` calibration inputs of the layer.
        bits, group_size, symmetric: the grid the weight will be rounded onto (``group_size`` None: per channel).
        grid, max_shrink: the search's steps and its smallest ratio ``1 - max_shrink``.
        reduce: applied to the errors ``(steps, out, groups)`` before the choice, e.g. a sum across processes that
            each hold some of the tokens (None: this ``x`` only).

    Returns:
        float32 ``(out, in / group_size)`` (``(out, 1)`` per channel) ratios in ``(0, 1]``.
    """
    out, width = weight.shape
    g = group_size or width
    w = weight.detach().float().reshape(out, width // g, g)
    xg = x.detach().float().reshape(-1, width // g, g)
    lo, hi = w.amin(-1), w.amax(-1)
    ratios = [1 - i / grid for i in range(int(max_shrink * grid) + 1)]
    errors = torch.empty(len(ratios), out, width // g, dtype=torch.float64, device=w.device)
    for i, r in enumerate(ratios):
        qp = qparams_from_range(r * lo, r * hi, bits, symmetric)
        s, z = qp.scale[..., None], qp.zero_point[..., None]
        q = dequantize(quantize(w, expand_params(s, w.shape), expand_params(z, w.shape), bits), s, z)
        errors[i] = torch.einsum("tkg,okg->tok", xg, w - q).square().sum(0)  # (out, groups)
    if reduce is not None:
        errors = reduce(errors)
    return torch.tensor(ratios, device=w.device)[errors.argmin(0)]  # argmin: the first (largest r) of ties


def clip_weight(weight: Tensor, ratios: Tensor) -> Tensor:
    """``weight (out, in)`` clamped per row and group to ``[r·min, r·max]`` of that group (``ratios`` from
    :func:`clip_ratios`): min-max qparams of the result are those the search chose."""
    out, width = weight.shape
    w = weight.reshape(out, ratios.shape[1], -1)
    lo, hi = w.amin(-1, keepdim=True) * ratios[..., None], w.amax(-1, keepdim=True) * ratios[..., None]
    return torch.maximum(torch.minimum(w, hi), lo).reshape(out, width)
