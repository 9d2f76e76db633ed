"""GPTQ: Hessian accumulation and the blocked, error-compensating weight quantizer.

GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
quantizes a linear layer's weight ``W`` (out, in) one input column at a time, minimising the layer's output error
``||X Wᵀ - X Qᵀ||²`` over calibration inputs ``X`` (tokens, in). The error of each quantized column is spread onto
the not-yet-quantized columns through the Hessian ``H = 2 XᵀX`` of that objective: GPTQ's update with the Cholesky
factor of ``H⁻¹`` equals Babai's nearest-plane step with the triangular factor of ``H`` itself (Chen et al. 2025,
"The Geometry of LLM Quantization: GPTQ as Babai's Nearest Plane Algorithm"), which needs no inverse. All rows are
solved at once (the Hessian is shared), columns in blocks with lazy updates.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_compress.functional.quant import (
    QParams,
    check_bits,
    compute_qparams,
    dequantize,
    quant_range,
)

# Each Cholesky failure multiplies the dampening by 10, at most this many times.
MAX_DAMP_RETRIES = 10
# A Cholesky pivot² below this fraction of max(|diag H|) counts as a failure: the matrix is numerically singular.
MIN_PIVOT = 1e-12
# Matrix products and factorisations with fewer multiply-adds (~25 ms on one core) run on one thread, as does all
# elementwise work: beside a busy process, every parallel step of two threads waits ~10 ms for the descheduled one.
PARALLEL_MIN_WORK = 2**30
# Columns per sub-block inside a block: elementwise updates within it, a matrix product after it.
SUB_BLOCK = 16


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


@contextlib.contextmanager
def _threads(n: int) -> Iterator[int]:
    """Run the body on ``n`` torch threads; yields the count before, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def _compensation(flipped: Tensor, percdamp: float, threads: int) -> tuple[Tensor, float]:
    """``V = R / diag(R)`` (float32) of the upper-triangular ``R`` with ``H + λI = RRᵀ``, and ``λ``.

    ``flipped`` is ``JHJ`` (``H`` with rows and columns reversed, float64), dampened in place by
    ``λ = percdamp · mean(diag H)``, ×10 while its Cholesky factorisation ``LLᵀ`` fails; ``R = JLJ``. ``R⁻¹`` is the
    upper Cholesky factor of ``(H + λI)⁻¹`` that GPTQ's reference formulation uses.
    """
    n, diag = flipped.shape[0], flipped.diagonal()
    mean_diag, max_diag = diag.mean().abs().item() or 1.0, diag.abs().max().item()
    damp, added = percdamp * mean_diag, 0.0
    for attempt in range(MAX_DAMP_RETRIES + 1):
        diag.add_(damp - added)
        added = damp
        with _threads(threads if n**3 // 6 >= PARALLEL_MIN_WORK else 1):  # n³/6 multiply-adds
            chol, info = torch.linalg.cholesky_ex(flipped)
        if info.item() == 0 and chol.diagonal().min() ** 2 > MIN_PIVOT * max_diag:  # not (numerically) singular
            if attempt:
                warnings.warn(
                    f"GPTQ: Hessian not positive definite at percdamp={percdamp}; used damp={damp:.3g}", stacklevel=3
                )
            return chol.div_(chol.diagonal().clone()).float().flip(0, 1), damp
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag
    raise RuntimeError(f"GPTQ: Cholesky of the Hessian failed even with damp={damp / 10:.3g}")


def _validate(weight: Tensor, hessian: Tensor, group_size: int | None, percdamp: float, block_size: int) -> None:
    """Raise ``ValueError`` naming the first bad argument of :func:`gptq_quantize`."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian must be ({weight.shape[1]}, {weight.shape[1]}), got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian.sum(dtype=torch.float64)):  # one pass, no copy
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

    With ``R`` upper triangular, ``H + λI = RRᵀ``, for each column ``i`` (all rows at once), ``W`` the original weight::

        q_i = dequantize(quantize(w_i))        w_i = W_i + Σ_{k<i} (W_k - q_k) · R_ki / R_ii

    which is GPTQ's ``err = (w_i - q_i) / U_ii``, ``w_j -= err · U_ij`` with ``U = R⁻¹`` the upper Cholesky factor of
    ``H⁻¹``, without the inverse. The sum is applied inside blocks of ``block_size`` columns and lazily (one matrix
    product) for each block. Everything runs on one thread but the large factorisation and products (a loop of small
    ops at two threads slows 30× or more when another process shares the CPU).
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
    with _threads(1) as threads:  # elementwise ops and small products; see PARALLEL_MIN_WORK
        check_bits(bits)
        _validate(weight, hessian, group_size, percdamp, block_size)
        w, h = weight.detach().float(), hessian.detach().to(torch.float64)  # read only: not copied
        n, rows, dead = w.shape[1], w.shape[0], h.diagonal() == 0
        if dead.any():
            w = w.clone()
            w[:, dead] = 0.0
        diag = h.diagonal().masked_fill(dead, 1.0)
        perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n, device=w.device)
        dynamic = group_size is not None and not static_groups
        if dynamic:  # one row per group in solve order, filled by the solver at each group's first column
            scale, zero = w.new_empty(n // group_size, rows), w.new_empty(n // group_size, rows)
            group = torch.arange(n, device=w.device) // group_size
        else:  # qparams up front in the original column order: per channel or static groups
            qp = compute_qparams(w, bits, symmetric, axis=0 if group_size is None else None, group_size=group_size)
            scale, zero = qp.scale.T.contiguous(), qp.zero_point.T.contiguous()
            group = perm // group_size if group_size else torch.zeros_like(perm)  # row of scale for each column
        # in solve order: the weight transposed (one row per column), the Hessian reversed (JHJ)
        rev = perm.flip(0)
        wt, flipped = (w.T[perm], h[rev][:, rev]) if act_order else (w.T.contiguous(), h.flip(0, 1))
        flipped.diagonal()[dead[rev]] = 1.0
        v, damp = _compensation(flipped, percdamp, threads)
        gs = group_size if dynamic else None
        solved = _solve(wt, v, scale, zero, group.tolist(), bits, symmetric, gs, block_size, threads)
        codes = solved.to(torch.int8)
        codes = (codes[torch.argsort(perm)] if act_order else codes).T.contiguous()
        if dynamic and act_order:  # groups formed in solve order are scattered: one (scale, zero) per column
            qp = QParams(torch.empty_like(w), torch.empty_like(w))
            qp.scale[:, perm], qp.zero_point[:, perm] = scale[group].T, zero[group].T
        elif dynamic:  # contiguous groups
            qp = QParams(scale.T.contiguous(), zero.T.contiguous())
        deq = dequantize(codes, qp.scale, qp.zero_point)
        if not torch.isfinite(solved.sum() + deq.sum()):  # one pass each, no copies
            raise RuntimeError("GPTQ produced non-finite weights")
        return GPTQResult(deq, codes, qp.scale, qp.zero_point, damp)


def _solve(
    wt: Tensor,
    v: Tensor,
    scale: Tensor,
    zero: Tensor,
    group: list[int],
    bits: int,
    symmetric: bool,
    group_size: int | None,
    block_size: int,
    threads: int,
) -> Tensor:
    """The blocked GPTQ loop over the rows of ``wt``, the weight transposed (in, out); returns the float codes alike.

    ``v`` is ``R / diag(R)`` (in, in); column ``i`` uses the qparams in row ``group[i]`` of ``scale`` / ``zero``
    (groups, out). With ``group_size`` (then ``group[i] = i // group_size``) that row is computed from the current
    weights at the group's first column. Each block gets the compensation for all earlier columns in one product;
    inside it, sub-blocks of ``SUB_BLOCK`` columns (split at group starts) update each other by one small product.
    Called on one thread; only the per-block product uses ``threads``, when it has ``PARALLEL_MIN_WORK``
    multiply-adds.
    """
    qmin, qmax = quant_range(bits)
    n, g = wt.shape[0], group_size or wt.shape[0]
    codes, delta = torch.empty_like(wt), torch.empty_like(wt)  # delta: W - Q, one row per column
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        with _threads(threads if i1 * (i2 - i1) * wt.shape[1] >= PARALLEL_MIN_WORK else 1):
            w1 = torch.addmm(wt[i1:i2], v[:i1, i1:i2].T, delta[:i1])  # the current weights of the block
        bounds = sorted({*range(i1, i2, SUB_BLOCK), *range(i1 + -i1 % g, i2, g), i2})  # sub-blocks
        for k1, k2 in pairwise(bounds):
            for i in range(k1, k2):
                if group_size is not None and i % group_size == 0:  # rows i - i1.. of w1 are up to date
                    e = i + group_size
                    cur = w1[i - i1 : e - i1]
                    if e > i2:  # the rest of the group, with the compensation so far
                        cur = torch.cat([cur, torch.addmm(wt[i2:e], v[:i, i2:e].T, delta[:i])])
                    # GPTQ's current weights (the best fit given columns < i): W + (w - W) V_gg⁻¹ on the group
                    cur = wt[i:e] + torch.linalg.solve_triangular(v[i:e, i:e].T, cur - wt[i:e], upper=False)
                    qp = compute_qparams(cur, bits, symmetric, axis=1)
                    scale[group[i]], zero[group[i]] = qp.scale[0], qp.zero_point[0]
                s, z, c = scale[group[i]], zero[group[i]], codes[i]
                torch.div(w1[i - i1], s, out=c).add_(z).round_().clamp_(qmin, qmax)  # == quantize(), bit for bit
                torch.sub(wt[i], (c - z).mul_(s), out=delta[i])
                w1[i - i1 + 1 : k2 - i1].addr_(v[i, i + 1 : k2], delta[i])
            w1[k2 - i1 :].addmm_(v[k1:k2, k2:i2].T, delta[k1:k2])
    return codes
