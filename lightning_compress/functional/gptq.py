"""GPTQ: Hessian accumulation and the blocked, error-compensating weight quantizer.

GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
quantizes a linear layer's weight ``W`` (out, in) one input column at a time, minimising the layer's output error
``||X Wᵀ - X Qᵀ||²`` over calibration inputs ``X`` (tokens, in). The error of each quantized column is spread onto
the not-yet-quantized columns through the Hessian ``H = 2 XᵀX`` of that objective: GPTQ's update with the Cholesky
factor of ``H⁻¹`` equals Babai's nearest-plane step with the triangular factor of ``H`` itself (Chen et al. 2025,
"The Geometry of LLM Quantization: GPTQ as Babai's Nearest Plane Algorithm"), which needs no inverse. All rows are
solved at once (the Hessian is shared), columns in blocks with lazy updates.

Two solvers: :func:`gptq_quantize`, the fast one (float32, the factor of ``H``), and
:func:`gptq_quantize_reference`, the paper's Algorithm 1 as written (float64, the factor of ``H⁻¹``), the definition
the tests hold the fast one to. Both take their options as one validated value, :class:`GPTQOptions`. Neither
touches torch's global thread state: the caller may pass a thread policy (:data:`ThreadPolicy`, e.g.
:func:`lightning_compress.calibration.threads.gptq_threads`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_compress.functional.masks import n_pruned, nm_mask, topk_mask
from lightning_compress.functional.quant import (
    QParams,
    check_bits,
    check_method,
    check_scale_dtype,
    compute_qparams,
    dequantize,
    fp8_e4m3,
    quant_range,
    round_to_grid,
)

# Each Cholesky failure multiplies the dampening by 10, at most this many times.
MAX_DAMP_RETRIES = 10
# A Cholesky pivot² below this fraction of max(|diag H|) counts as a failure: the matrix is numerically singular.
MIN_PIVOT = 1e-12
# Columns per sub-block inside a block: elementwise updates within it, a matrix product after it.
SUB_BLOCK = 16

ThreadPolicy = Callable[[int], AbstractContextManager[None]]
"""``policy(work)`` is entered around an operation of ``work`` multiply-adds, and with 0 around a loop of small ops."""


@dataclass(frozen=True)
class GPTQOptions:
    """The options of a GPTQ solve (Frantar et al. 2023), validated once, when built; the same for both solvers.

    Only the checks that need no tensor are here; :func:`gptq_quantize` checks the rest against the weight and
    Hessian (``group_size`` must divide ``in_features``).

    Attributes:
        bits: code width in ``[2, 8]``; codes lie in ``quant_range(bits)``.
        group_size: inputs per scale of each row (it must divide ``in_features``); ``None`` for per channel.
        symmetric: symmetric (zero-point 0) or asymmetric min-max qparams.
        act_order: solve columns in descending ``diag(H)`` order (results returned in the original order).
        static_groups: with groups, compute all group qparams up front from the weight in the original column
            order, so groups stay contiguous (exportable ``(out, in / group_size)`` params) under ``act_order``.
        percdamp: dampening ``λ = percdamp · mean(diag H)`` added to the Hessian's diagonal; :func:`gptq_quantize`
            raises it ×10 (with a warning) while the Cholesky factorisation fails, the reference does not.
        block_size: columns per lazy-update block (the paper's ``B``).
        clip_search: choose each channel's (or group's) range by the clipping search of
            :func:`~lightning_compress.functional.quant.compute_qparams` (the reference's ``mse`` quantizer) instead
            of min-max.
        method: the grid, ``"linear"`` (signed integers) or ``"fp8"`` (E4M3 values, ``bits=8``, symmetric: the
            codes are ``torch.float8_e4m3fn``).
        scale_dtype: round every scale to ``"float16"`` or ``"bfloat16"`` as it is made (None: float32), so a file
            format storing scales in that dtype (GGUF: fp16) holds exactly the grid the codes were solved on.

    Raises:
        TypeError: ``bits`` is not an int. ValueError: a field out of range or of the wrong type (named, with the
            bad value and what is allowed).
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    clip_search: bool = False
    method: str = "linear"
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_method(self.method, self.bits, self.symmetric)
        check_scale_dtype(self.scale_dtype)
        g, damp, block = self.group_size, self.percdamp, self.block_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"group_size must be a positive int or None, got {g!r}")
        for name in ("symmetric", "act_order", "static_groups", "clip_search"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (True or False), got {getattr(self, name)!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
            raise ValueError(f"percdamp must be a number >= 0, got {damp!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block_size must be a positive int, got {block!r}")


class GPTQResult(NamedTuple):
    """Output of :func:`gptq_quantize` and :func:`gptq_quantize_reference`.

    Attributes:
        weight: float32 ``(out, in)``, exactly ``dequantize(codes, scale, zero_point)``.
        codes: int8 ``(out, in)`` in the original column order, within ``quant_range(bits)`` (``method="fp8"``:
            ``torch.float8_e4m3fn``).
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


def _unchanged_threads(work: int) -> AbstractContextManager[None]:
    """The default :data:`ThreadPolicy`: a no-op context, every operation on the threads the caller has set."""
    return contextlib.nullcontext()


def _compensation(flipped: Tensor, percdamp: float, threads: ThreadPolicy) -> tuple[Tensor, Tensor, float]:
    """``V = R / diag(R)`` and ``diag(R)`` (float32) of the upper-triangular ``R`` with ``H + λI = RRᵀ``, and ``λ``.

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
        with threads(n**3 // 6):  # multiply-adds of the factorisation
            chol, info = torch.linalg.cholesky_ex(flipped)
        if info.item() == 0 and chol.diagonal().min() ** 2 > MIN_PIVOT * max_diag:  # not (numerically) singular
            if attempt:
                warnings.warn(
                    f"GPTQ: Hessian not positive definite at percdamp={percdamp}; used damp={damp:.3g}", stacklevel=3
                )
            rdiag = chol.diagonal().clone()
            return chol.div_(rdiag).float().flip(0, 1), rdiag.float().flip(0), damp
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag
    raise RuntimeError(f"GPTQ: Cholesky of the Hessian failed even with damp={damp / 10:.3g}")


def check_solver_inputs(weight: Tensor, hessian: Tensor, options: GPTQOptions | None) -> GPTQOptions:
    """The checks of both solvers that need the tensors; returns ``options`` (``GPTQOptions()`` for ``None``).

    ``weight`` must be 2-D ``(out, in)``, ``hessian`` a finite ``(in, in)``, and ``options.group_size`` divide ``in``;
    ``ValueError`` names the first bad argument, ``TypeError`` an ``options`` that is not a :class:`GPTQOptions`.
    """
    if options is None:
        options = GPTQOptions()
    elif not isinstance(options, GPTQOptions):
        raise TypeError(f"options must be a GPTQOptions or None, got {type(options).__name__}")
    group_size = options.group_size
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian must be ({weight.shape[1]}, {weight.shape[1]}), got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian.sum(dtype=torch.float64)):  # one pass, no copy
        raise ValueError("hessian contains NaN or inf")
    if group_size is not None and weight.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} must be a positive divisor of in_features={weight.shape[1]}")
    return options


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    options: GPTQOptions | None = None,
    threads: ThreadPolicy | None = None,
    keep: Tensor | None = None,
) -> GPTQResult:
    """Quantize a linear weight with GPTQ (Frantar et al. 2023), minimising ``||X(W - Q)ᵀ||²``; the fast solver.

    It computes what :func:`gptq_quantize_reference` (the paper's Algorithm 1) computes, but in float32 (rare
    rounding ties fall the other way) and with the triangular factor of ``H`` instead of that of ``H⁻¹`` (Babai's
    nearest plane, Chen et al. 2025). With ``H + λI = RRᵀ``, ``R`` upper triangular, ``U = R⁻¹`` is the paper's
    ``Cholesky(H⁻¹)ᵀ``. Let ``δ = W - Q`` (original weight minus quantized, per column). The paper's error
    ``E_j = (w_j - q_j) / U_jj`` is then ``(δR)_j``, and the paper's ``w_j = W_j - Σ_{k<j} E_k U_kj`` at the time
    column ``j`` is quantized equals, for all rows at once::

        w_j = W_j + Σ_{k<j} δ_k · V_kj,        V = R · diag(R)⁻¹

    which needs no inverse. Algorithm 1, line by line, and the code that does it (``wt`` is the weight transposed,
    one row per column, in solve order; ``delta`` is ``δ`` alike; the paper's column ``j`` is ``i`` in ``_solve``)::

        Algorithm 1                              here (B = options.block_size)
        U ← Cholesky(H⁻¹)ᵀ                       _compensation: chol = cholesky_ex(JHJ) (H reversed, = LLᵀ), so
                                                 R = JLJ = U⁻¹; returns v = V (diag R divided out: the U_jj)
        for i1 = 0, B, 2B, ...                   _solve: for i1 in range(0, n, block_size)
          (W[:, i1:i2] is current: implicit)     w1 = addmm(wt[i1:i2], v[:i1, i1:i2].T, delta[:i1]), one product
          for j = i1, ..., i2 - 1                for k1, k2 in sub-blocks (SUB_BLOCK columns, cut at group starts):
                                                   for i in range(k1, k2):
            Q[:, j] ← quant(W[:, j])                 c = codes[i] = clamp(round(w1[i - i1] / s + z)), = quantize()
            E[:, j] ← (W - Q)[:, j] / U_jj           delta[i] = wt[i] - (c - z) · s: against the original column
            W[:, j:i2] -= E[:, j] ⊗ U[j, j:i2]       w1[i - i1 + 1 : k2 - i1] += outer(v[i, i + 1 : k2], delta[i]),
                                                   then w1[k2 - i1 :] += v[k1:k2, k2:i2].T @ delta[k1:k2] (lazy)
          W[:, i2:] -= E · U[i1:i2, i2:]         nothing: the next block's addmm pulls in all earlier delta
                                                 (i1 · B multiply-adds per row, not (n - i2) · B; n²/2 in all)

    ``w1`` rows are the paper's ``w`` only for columns whose predecessors are all in. A group's qparams (taken at
    its first column from the current weights of the whole group, as in the paper) need the paper's intermediate
    weights there, ``W + (w1 - W) · V_gg⁻¹`` on the group's columns ``g``: one triangular solve. Min-max qparams
    (:func:`compute_qparams`) are per row: per channel from the whole weight up front, per group from those current
    weights (or up front with ``static_groups``). The dampening ``λ = percdamp · mean(diag H)`` is raised ×10 (with
    a warning) while the Cholesky factorisation fails.

    Args:
        weight: ``(out, in)`` float weight.
        hessian: ``(in, in)`` Hessian sum from :func:`hessian_update` (any positive scale).
        options: bits, groups, order, dampening and block size (:class:`GPTQOptions`); ``None`` for the defaults.
        threads: a context manager factory: ``threads(work)`` is entered around an operation of ``work``
            multiply-adds (the Cholesky, each block's product) and around the whole solve with ``work=0`` (the loop
            of small ops), e.g. :func:`lightning_compress.calibration.threads.gptq_threads`. ``None``: everything
            runs on the threads the caller has set for torch. The results do not depend on it.
        keep: bool ``(out, in)``: where False the weight becomes exactly 0 (its code the zero-point) and, as in
            SparseGPT, its error is compensated by the weights kept: GPTQ on a pruned model keeps it pruned
            (``keep = weight != 0``). ``None``: nothing is held.

    Returns:
        :class:`GPTQResult`; inputs with ``H_ii = 0`` (never active) get weight 0.

    Raises:
        ValueError: a bad argument (named). TypeError: ``options`` is not a :class:`GPTQOptions`. RuntimeError: the
            Hessian cannot be factorised or the result is not finite.
    """
    pruning = None if keep is None else Pruning(0.0, mask=_check_keep(keep, weight))
    weight_q, codes, qp, damp, _ = solve_columns(weight, hessian, options, threads, pruning=pruning)
    return GPTQResult(weight_q, codes, qp.scale, qp.zero_point, damp)


def _check_keep(keep: Tensor, weight: Tensor) -> Tensor:
    """``keep`` as a bool mask on ``weight``'s device; ValueError unless it is a bool tensor of the weight's shape."""
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != weight.shape:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a bool tensor of the weight's shape {tuple(weight.shape)}, got {got}")
    return keep.to(weight.device)


class Pruning(NamedTuple):
    """What the column loop of :func:`solve_columns` prunes (SparseGPT, Frantar & Alistarh 2023).

    Attributes:
        sparsity: unstructured: the fraction of each block of ``block_size`` columns removed (``round(sparsity ·
            out · block)`` weights of the lowest ``w² / [H⁻¹]_jj²`` in the block, all rows together).
        nm: ``(n, m)``: keep the ``n`` of every ``m`` consecutive inputs of a row with the highest ``w² / [H⁻¹]_jj²``
            instead (``sparsity`` is then ``1 - n / m``).
        mask: a fixed bool keep-mask ``(out, in)`` instead of either (``sparsity`` and ``nm`` unused): the weights
            where it is False are pruned, their error compensated all the same (GPTQ holding a pruned model's
            zeros). Any column order.
    """

    sparsity: float
    nm: tuple[int, int] | None = None
    mask: Tensor | None = None


def solve_columns(
    weight: Tensor,
    hessian: Tensor,
    options: GPTQOptions | None = None,
    threads: ThreadPolicy | None = None,
    quantize: bool = True,
    pruning: Pruning | None = None,
) -> tuple[Tensor, Tensor | None, QParams | None, float, Tensor | None]:
    """The one error-compensating column loop of GPTQ and SparseGPT: each input column is rounded onto the grid
    (``quantize``), pruned (``pruning``) or both, and its error spread onto the columns not yet solved.

    See :func:`gptq_quantize` for the loop and the options; ``pruning`` chooses its masks from the current weights
    (SparseGPT's adaptive mask selection: per block, or per ``m`` columns for N:M) or takes its fixed ``mask``. With
    a chosen mask, ``act_order`` and groups whose qparams are taken during the solve (``group_size`` without
    ``static_groups``) are not offered (:func:`~lightning_compress.functional.sparsegpt.sparsegpt_prune` checks).

    Returns:
        ``(weight, codes, qparams, damp, keep)``: float32 ``(out, in)`` weight (dequantized codes when
        ``quantize``, pruned where ``keep`` is False); int8 codes (or None) and their qparams (see
        :class:`GPTQResult`); the dampening; bool keep-mask ``(out, in)`` (None without ``pruning``).
    """
    threads = threads or _unchanged_threads
    with threads(0):  # elementwise ops and small products
        options = check_solver_inputs(weight, hessian, options)
        bits, group_size, symmetric, act_order = options.bits, options.group_size, options.symmetric, options.act_order
        clip, method, stored = options.clip_search, options.method, options.scale_dtype
        w, h = weight.detach().float(), hessian.detach().to(torch.float64)  # read only: not copied
        n, rows, dead = w.shape[1], w.shape[0], h.diagonal() == 0
        if dead.any():
            w = w.clone()
            w[:, dead] = 0.0
        diag = h.diagonal().masked_fill(dead, 1.0)
        perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n, device=w.device)
        dynamic = quantize and group_size is not None and not options.static_groups
        if dynamic:  # one row per group in solve order, filled by the solver at each group's first column
            scale, zero = w.new_empty(n // group_size, rows), w.new_empty(n // group_size, rows)
            group = torch.arange(n, device=w.device) // group_size
        elif quantize:  # qparams up front in the original column order: per channel or static groups
            axis = 0 if group_size is None else None
            kept = w if pruning is None or pruning.mask is None else w * pruning.mask
            qp = compute_qparams(kept, bits, symmetric, axis, group_size, clip, method, stored)
            scale, zero = qp.scale.T.contiguous(), qp.zero_point.T.contiguous()
            group = perm // group_size if group_size else torch.zeros_like(perm)  # row of scale for each column
        # in solve order: the weight transposed (one row per column), the Hessian reversed (JHJ)
        rev = perm.flip(0)
        wt, flipped = (w.T[perm], h[rev][:, rev]) if act_order else (w.T.contiguous(), h.flip(0, 1))
        flipped.diagonal()[dead[rev]] = 1.0
        v, rdiag, damp = _compensation(flipped, options.percdamp, threads)
        grid = (
            _Grid(scale, zero, group.tolist(), bits, symmetric, group_size if dynamic else None, clip, method, stored)
            if quantize
            else None
        )
        fixed = None if pruning is None or pruning.mask is None else pruning.mask.T[perm].contiguous()
        solved, keep = _solve(wt, v, grid, pruning, rdiag, options.block_size, threads, fixed)
        back = torch.argsort(perm) if act_order else None
        keep = None if keep is None else (keep[back] if act_order else keep).T.contiguous()
        if not quantize:
            out = (solved[back] if act_order else solved).T.contiguous()
            if not torch.isfinite(out.sum()):
                raise RuntimeError("GPTQ produced non-finite weights")
            return out, None, None, damp, keep
        codes = solved.to(torch.float8_e4m3fn if method == "fp8" else torch.int8)  # exact: on the grid
        codes = (codes[back] if act_order else codes).T.contiguous()
        if dynamic and act_order:  # groups formed in solve order are scattered: one (scale, zero) per column
            qp = QParams(torch.empty_like(w), torch.empty_like(w))
            qp.scale[:, perm], qp.zero_point[:, perm] = scale[group].T, zero[group].T
        elif dynamic:  # contiguous groups
            qp = QParams(scale.T.contiguous(), zero.T.contiguous())
        deq = dequantize(codes, qp.scale, qp.zero_point)
        if not torch.isfinite(solved.sum() + deq.sum()):  # one pass each, no copies
            raise RuntimeError("GPTQ produced non-finite weights")
        return deq, codes, qp, damp, keep


class _Grid(NamedTuple):
    """The quantization grid of :func:`_solve`: column ``i`` uses row ``group[i]`` of ``scale`` / ``zero``
    (groups, out); with ``group_size`` that row is computed from the current weights at the group's first column."""

    scale: Tensor
    zero: Tensor
    group: list[int]
    bits: int
    symmetric: bool
    group_size: int | None
    clip_search: bool
    method: str = "linear"
    scale_dtype: str | None = None


def _solve(
    wt: Tensor,
    v: Tensor,
    grid: _Grid | None,
    pruning: Pruning | None,
    rdiag: Tensor,
    block_size: int,
    threads: ThreadPolicy,
    fixed: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The blocked loop over the rows of ``wt``, the weight transposed (in, out); returns the float codes alike (the
    solved weights without a ``grid``) and the keep-mask alike (None without ``pruning``; ``fixed``, the pruning's
    fixed mask alike, when it has one).

    ``v`` is ``R / diag(R)`` (in, in) and ``rdiag`` is ``diag(R)``: SparseGPT's score ``w² / [H⁻¹]_jj²`` is
    ``(w · R_jj)²``. Each block gets the compensation for all earlier columns in one product; inside it, sub-blocks
    of ``SUB_BLOCK`` columns (split at group starts and N:M groups, where every row of the block is current) update
    each other by one small product. Each block's product runs under ``threads(multiply-adds)``, the rest under the
    caller's ``threads(0)``.
    """
    n = wt.shape[0]
    qmin, qmax = quant_range(grid.bits) if grid is not None else (0, 0)
    g = (grid.group_size if grid is not None else None) or n
    choose = pruning is not None and fixed is None
    nm = pruning.nm if choose else None
    m = nm[1] if nm is not None else n
    out, delta = torch.empty_like(wt), torch.empty_like(wt)  # delta: W - Q, one row per column
    keep = fixed if fixed is not None else torch.ones_like(wt, dtype=torch.bool) if choose else None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        with threads(i1 * (i2 - i1) * wt.shape[1]):
            w1 = torch.addmm(wt[i1:i2], v[:i1, i1:i2].T, delta[:i1])  # the current weights of the block
        if choose and nm is None:  # SparseGPT's adaptive mask: the block's lowest (w R_jj)²
            scores = (_paper_weights(wt, v, w1, i1, i2) * rdiag[i1:i2, None]).square_()
            keep[i1:i2] = topk_mask(scores, scores.numel() - n_pruned(scores.numel(), pruning.sparsity))
        bounds = sorted({*range(i1, i2, SUB_BLOCK), *range(i1 + -i1 % g, i2, g), *range(i1 + -i1 % m, i2, m), i2})
        for k1, k2 in pairwise(bounds):
            for i in range(k1, k2):
                if nm is not None and i % m == 0:  # at a bound: rows i - i1.. of w1 are all current
                    scores = (
                        _paper_weights(wt, v, w1[i - i1 : i - i1 + m], i, i + m) * rdiag[i : i + m, None]
                    ).square_()
                    keep[i : i + m] = nm_mask(scores.T, *nm).T
                if grid is None:  # prune only: the current weight where kept
                    torch.mul(w1[i - i1], keep[i], out=out[i])
                    torch.sub(wt[i], out[i], out=delta[i])
                else:
                    if grid.group_size is not None and i % g == 0:  # rows i - i1.. of w1 are up to date
                        _group_qparams(grid, wt, v, w1, delta, i, i1, i2, fixed)
                    s, z, c = grid.scale[grid.group[i]], grid.zero[grid.group[i]], out[i]
                    if grid.method == "fp8":  # the saturated nearest E4M3 value (zero-point 0)
                        c.copy_(fp8_e4m3(w1[i - i1] / s))
                    else:
                        torch.div(w1[i - i1], s, out=c).add_(z).round_().clamp_(
                            qmin, qmax
                        )  # == quantize(), bit for bit
                    if keep is not None:
                        torch.where(keep[i], c, z, out=c)  # a pruned weight's code is the zero-point: exactly 0
                    torch.sub(wt[i], (c - z).mul_(s), out=delta[i])
                w1[i - i1 + 1 : k2 - i1].addr_(v[i, i + 1 : k2], delta[i])
            w1[k2 - i1 :].addmm_(v[k1:k2, k2:i2].T, delta[k1:k2])
    return out, keep


def _paper_weights(wt: Tensor, v: Tensor, current: Tensor, i: int, e: int) -> Tensor:
    """The paper's intermediate weights of columns ``i..e`` once columns ``< i`` are solved, from ``current`` (their
    rows of ``w1`` with the compensation of every column ``< i``): ``W + (w1 - W) V_gg⁻¹`` on those columns ``g``.

    ``w1`` row ``j`` is the paper's weight only once all columns ``< j`` are in; a mask or qparams chosen for a
    whole span of columns at its first (SparseGPT's scores, a group's range) need the paper's weights of the span.
    """
    return wt[i:e] + torch.linalg.solve_triangular(v[i:e, i:e].T, current - wt[i:e], upper=False)


def _group_qparams(
    grid: _Grid, wt: Tensor, v: Tensor, w1: Tensor, delta: Tensor, i: int, i1: int, i2: int, keep: Tensor | None
) -> None:
    """Fill row ``grid.group[i]`` of the grid with the qparams of the group starting at column ``i``, from GPTQ's
    current weights of the whole group (the best fit given columns < i, :func:`_paper_weights`), zero where a fixed
    ``keep`` (solve order) prunes."""
    e = i + grid.group_size
    cur = w1[i - i1 : e - i1]
    if e > i2:  # the rest of the group, with the compensation so far
        cur = torch.cat([cur, torch.addmm(wt[i2:e], v[:i, i2:e].T, delta[:i])])
    cur = _paper_weights(wt, v, cur, i, e)
    if keep is not None:
        cur = cur * keep[i:e]
    qp = compute_qparams(cur, grid.bits, grid.symmetric, 1, None, grid.clip_search, grid.method, grid.scale_dtype)
    grid.scale[grid.group[i]], grid.zero[grid.group[i]] = qp.scale[0], qp.zero_point[0]


def gptq_quantize_reference(
    weight: Tensor, hessian: Tensor, options: GPTQOptions | None = None, keep: Tensor | None = None
) -> GPTQResult:
    """GPTQ as the paper writes it (Algorithm 1 of Frantar et al. 2023), in float64: the definition, slow.

    The same options and results as :func:`gptq_quantize`, which must match it (up to rare rounding ties: that one
    runs in float32); the tests compare them. With ``U = Cholesky((H + λI)⁻¹)ᵀ`` (upper, ``UᵀU = (H + λI)⁻¹``),
    ``λ = percdamp · mean(diag H)``, for blocks ``[i1, i2)`` of ``block_size`` columns (the fields of ``options``)
    and each column ``j`` in them::

        Q[:, j] = quant(W[:, j])
        E[:, j - i1] = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:i2] -= E[:, j - i1] ⊗ U[j, j:i2]
        W[:, i2:] -= E · U[i1:i2, i2:]                 (lazily, once per block)

    Per-channel qparams come from the whole weight up front; group qparams from the group's current weights when
    ``j`` is its first column (with the block's pending update applied where the group runs past the block), or up
    front in the original column order with ``static_groups``. ``act_order`` solves columns in descending
    ``diag(H)`` order. Inputs with ``H_jj = 0`` get weight 0 (and ``H_jj = 1``). No dampening retries: a Hessian
    that is not positive definite after ``λ`` raises ``torch.linalg.LinAlgError``. With ``keep``, ``Q[:, j]`` is 0
    where it is False (qparams from ``W · keep``).

    Args:
        weight: ``(out, in)`` float weight.
        hessian: ``(in, in)`` Hessian ``2 XᵀX`` (any positive scale).
        options: as for :func:`gptq_quantize` (:class:`GPTQOptions`); ``None`` for the defaults.
        keep: as for :func:`gptq_quantize`.

    Returns:
        :class:`GPTQResult` with the shapes :func:`gptq_quantize` returns.
    """
    options = check_solver_inputs(weight, hessian, options)
    bits, group_size, symmetric, act_order = options.bits, options.group_size, options.symmetric, options.act_order
    block_size = options.block_size
    w, h = weight.detach().double().clone(), hessian.detach().double().clone()
    dead = h.diagonal() == 0
    w[:, dead], h[dead, dead] = 0.0, 1.0
    n, dynamic = w.shape[1], group_size is not None and not options.static_groups
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else _check_keep(keep, weight)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(n, device=w.device)
    axis, clip, method, stored = (
        0 if group_size is None else None,
        options.clip_search,
        options.method,
        options.scale_dtype,
    )
    qp = compute_qparams((w * keep).float(), bits, symmetric, axis, group_size, clip, method, stored)
    damp = options.percdamp * h.diagonal().mean().item()
    h = h + damp * torch.eye(n, dtype=h.dtype, device=h.device)
    w, h, keep = w[:, perm], h[perm][:, perm], keep[:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H⁻¹ = UᵀU
    order = perm.tolist()
    codes, scale, zero = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)  # per column, solve order
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        err = w.new_zeros(w.shape[0], i2 - i1)  # E: the block's errors
        for j in range(i1, i2):
            if dynamic and j % group_size == 0:  # the group's current weights, past the block with E so far
                cur = w[:, j : j + group_size].clone()
                cur[:, i2 - j :] -= err[:, : j - i1] @ u[i1:j, i2 : j + group_size]
                cur *= keep[:, j : j + group_size]
                s, z = compute_qparams(cur.float(), bits, symmetric, 0, None, clip, method, stored)
            elif not dynamic:  # up front, in the original order: column perm[j]'s channel or group
                col = order[j] // group_size if group_size else 0
                s, z = qp.scale[:, col : col + 1], qp.zero_point[:, col : col + 1]
            scale[:, j], zero[:, j] = s[:, 0], z[:, 0]
            codes[:, j] = round_to_grid(w[:, j] / scale[:, j] + zero[:, j], bits, method)
            codes[:, j] = torch.where(keep[:, j], codes[:, j], zero[:, j])
            err[:, j - i1] = (w[:, j] - (codes[:, j] - zero[:, j]) * scale[:, j]) / u[j, j]
            w[:, j:i2] -= torch.outer(err[:, j - i1], u[j, j:i2])
        w[:, i2:] -= err @ u[i1:i2, i2:]
    back = torch.argsort(perm)
    codes = codes[:, back].to(torch.float8_e4m3fn if method == "fp8" else torch.int8)
    if dynamic:  # the qparams each column used, original order: per column under act_order, else per group
        step = 1 if act_order else group_size
        qp = QParams(scale[:, back][:, ::step].float(), zero[:, back][:, ::step].float())
    return GPTQResult(dequantize(codes, qp.scale, qp.zero_point), codes, qp.scale, qp.zero_point, damp)
