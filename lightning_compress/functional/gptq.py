"""GPTQ: Hessian accumulation and the blocked, error-compensating weight quantizer.

GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
quantizes a linear layer's weight ``W`` (out, in) one input column at a time, minimising the layer's output error
``||X Wᵀ - X Qᵀ||²`` over calibration inputs ``X`` (tokens, in). The error of each quantized column is spread onto
the not-yet-quantized columns through the inverse Hessian ``H⁻¹`` of that objective, ``H = 2 XᵀX``. All rows are
solved at once (the Hessian is shared), columns in blocks with lazy updates of the columns after each block.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_compress.functional.quant import (
    QParams,
    check_bits,
    compute_qparams,
    dequantize,
    expand_params,
    quant_range,
)

# Each Cholesky failure multiplies the dampening by 10, at most this many times.
MAX_DAMP_RETRIES = 10
# A Cholesky pivot² below this fraction of max(|diag H|) counts as a failure: the matrix is numerically singular.
MIN_PIVOT = 1e-12


class GPTQResult(NamedTuple):
    """Output of :func:`gptq_quantize`.

    Attributes:
        weight: float32 ``(out, in)``, exactly ``dequantize(codes, scale, zero_point)``.
        codes: int8 ``(out, in)`` in the original column order, within ``quant_range(bits)``.
        scale: float32 block-shaped scales: ``(out, 1)`` per channel, ``(out, in / group_size)`` per group, or
            ``(out, in)`` (each column its group's scale) for ``act_order`` groups without ``static_groups``.
        zero_point: float32 integers, same shape as ``scale`` (zeros when symmetric).
        damp: the absolute dampening added to the Hessian's diagonal.
    """

    weight: Tensor
    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    damp: float


def hessian_update(hessian: Tensor | None, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Add one calibration batch to the running Hessian sum ``H += 2 XᵀX`` of GPTQ's layer-wise objective.

    The sum (not the mean) is kept so data-parallel ranks can all-reduce it with ``sum``; GPTQ is invariant to the
    Hessian's scale (the dampening is relative to ``mean(diag H)``).

    Args:
        hessian: the running sum ``(in, in)``, updated in place, or ``None`` to start from zero.
        x: layer inputs ``(..., in)``, flattened to ``(tokens, in)``.
        dtype: accumulation dtype when ``hessian`` is ``None``.

    Returns:
        The updated ``(in, in)`` Hessian (``hessian`` itself when given).
    """
    x = x.detach().reshape(-1, x.shape[-1])
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
    elif hessian.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} does not fit inputs with {x.shape[1]} features")
    x = x.to(hessian.dtype)
    return hessian.addmm_(x.T, x, alpha=2.0)


def _inverse_hessian_cholesky(hessian: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (float64), ``λ = percdamp · mean(diag H)``, ×10 on failure."""
    mean_diag = hessian.diagonal().mean().abs().item() or 1.0
    max_diag = hessian.diagonal().abs().max().item()
    damp, eye = percdamp * mean_diag, torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info.item() == 0 and chol.diagonal().min() ** 2 > MIN_PIVOT * max_diag:  # not (numerically) singular
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                if attempt:
                    warnings.warn(
                        f"GPTQ: Hessian not positive definite at percdamp={percdamp}; used damp={damp:.3g}",
                        stacklevel=3,
                    )
                return upper, damp
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag
    raise RuntimeError(f"GPTQ: Cholesky of the Hessian failed even with damp={damp / 10:.3g}")


def _validate(weight: Tensor, hessian: Tensor, group_size: int | None, percdamp: float, block_size: int) -> None:
    """Raise ``ValueError`` naming the first bad argument of :func:`gptq_quantize`."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian must be ({weight.shape[1]}, {weight.shape[1]}), got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or inf")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if group_size is not None and (group_size < 1 or weight.shape[1] % group_size):
        raise ValueError(f"group_size={group_size} must be a positive divisor of in_features={weight.shape[1]}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
) -> GPTQResult:
    """Quantize a linear weight with GPTQ (Frantar et al. 2023), minimising ``||X(W - Q)ᵀ||²``.

    With ``U`` the upper Cholesky factor of ``H⁻¹``, for each column ``i`` (all rows at once)::

        q_i = dequantize(quantize(w_i))        err = (w_i - q_i) / U_ii        w_j -= err · U_ij   (j > i)

    the update applied inside blocks of ``block_size`` columns and lazily (one matrix product) after each block.
    Min-max qparams (:func:`compute_qparams`) are per row: per channel from the whole weight up front, per group
    from the current (error-updated) weights when the solver reaches the group's first column.

    Args:
        weight: ``(out, in)`` float weight.
        hessian: ``(in, in)`` Hessian sum from :func:`hessian_update` (any positive scale).
        bits: code width in ``[2, 8]``.
        group_size: inputs per scale of each row; ``None`` for per channel.
        symmetric: symmetric (zero-point 0) or asymmetric qparams.
        act_order: solve columns in descending ``diag(H)`` order (results returned in the original order).
        static_groups: with groups, compute all group qparams up front from the weight in the original column
            order, so groups stay contiguous (exportable ``(out, in / group_size)`` params) under ``act_order``.
        percdamp: dampening ``λ = percdamp · mean(diag H)`` added to the diagonal; ×10 (with a warning) while the
            Cholesky factorisation fails.
        block_size: columns per lazy-update block.

    Returns:
        :class:`GPTQResult`; inputs with ``H_ii = 0`` (never active) get weight 0.

    Raises:
        ValueError: a bad argument (named). RuntimeError: the Hessian cannot be factorised or the result is not finite.
    """
    check_bits(bits)
    _validate(weight, hessian, group_size, percdamp, block_size)
    w = weight.detach().float().clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1], device=w.device)
    dynamic = group_size is not None and not static_groups
    col_scale, col_zero = torch.empty_like(w), torch.empty_like(w)  # per column in solve order
    if not dynamic:  # qparams up front in the original column order: per channel or static groups
        qp = compute_qparams(w, bits, symmetric, axis=0 if group_size is None else None, group_size=group_size)
        col_scale[:] = expand_params(qp.scale, w.shape).expand_as(w)[:, perm]
        col_zero[:] = expand_params(qp.zero_point, w.shape).expand_as(w)[:, perm]
    upper, damp = _inverse_hessian_cholesky(h[perm][:, perm], percdamp)
    solved = _solve(
        w[:, perm], upper.float(), col_scale, col_zero, bits, symmetric, group_size if dynamic else None, block_size
    )
    codes = torch.empty_like(solved, dtype=torch.int8)
    codes[:, perm] = solved.to(torch.int8)
    if dynamic and act_order:  # groups formed in solve order are scattered: one (scale, zero) per column
        qp = QParams(torch.empty_like(col_scale), torch.empty_like(col_zero))
        qp.scale[:, perm], qp.zero_point[:, perm] = col_scale, col_zero
    elif dynamic:  # contiguous groups: the params of each group's first column
        qp = QParams(col_scale[:, ::group_size].contiguous(), col_zero[:, ::group_size].contiguous())
    deq = dequantize(codes, qp.scale, qp.zero_point)
    if not torch.isfinite(deq).all():
        raise RuntimeError("GPTQ produced non-finite weights")
    return GPTQResult(deq, codes, qp.scale, qp.zero_point, damp)


def _solve(
    w: Tensor,
    upper: Tensor,
    col_scale: Tensor,
    col_zero: Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    block_size: int,
) -> Tensor:
    """The blocked GPTQ loop over the columns of ``w`` (out, in), in place; returns the float codes.

    ``upper`` is the upper Cholesky factor of ``H⁻¹`` (in, in). With ``group_size`` the group qparams are computed
    (and written to ``col_scale`` / ``col_zero``) from the current weights at each group's first column; the
    group's columns beyond the current block get the block's pending lazy update first.
    """
    qmin, qmax = quant_range(bits)
    codes = torch.empty_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, u1, err1 = w[:, i1:i2].clone(), upper[i1:i2, i1:i2], torch.empty_like(w[:, i1:i2])
        for j in range(i2 - i1):
            i = i1 + j
            if group_size is not None and i % group_size == 0:
                cur = w1[:, j : j + group_size]
                if i + group_size > i2:  # the rest of the group, with this block's updates so far
                    rest = w[:, i2 : i + group_size] - err1[:, :j] @ upper[i1:i, i2 : i + group_size]
                    cur = torch.cat([cur, rest], dim=1)
                col_scale[:, i : i + group_size], col_zero[:, i : i + group_size] = compute_qparams(
                    cur, bits, symmetric, axis=0
                )
            s, z = col_scale[:, i], col_zero[:, i]
            c = torch.round(w1[:, j] / s + z).clamp_(qmin, qmax)  # == quantize(), bit for bit
            codes[:, i] = c
            err1[:, j] = (w1[:, j] - (c - z) * s) / u1[j, j]
            w1[:, j + 1 :].addr_(err1[:, j], u1[j, j + 1 :], alpha=-1.0)
        w[:, i2:].addmm_(err1, upper[i1:i2, i2:], alpha=-1.0)
    return codes
