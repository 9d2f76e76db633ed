"""SparseGPT: one-shot pruning with GPTQ's error compensation (Frantar & Alistarh 2023).

SparseGPT ("SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot") prunes a linear weight ``W``
(out, in) column by column with the same Hessian ``H = 2 XᵀX`` and lazy-block loop as GPTQ: a pruned weight is set
to zero, and its error ``(w - 0) / [H⁻¹]_jj`` is spread onto the columns not yet solved, so the kept weights absorb
what the pruned ones did. The mask is chosen during the solve from the current (already compensated) weights by the
OBS saliency ``w² / [H⁻¹]_jj²`` (``[H⁻¹]`` the upper Cholesky factor of ``H⁻¹``, as in the paper's code): per block of
``block_size`` columns for unstructured sparsity, per ``m`` columns for N:M. Optionally the kept weights are
quantized in the same pass (joint sparsity + quantization, the paper's Section 3.5).

:func:`sparsegpt_prune` runs on GPTQ's column loop (:func:`~lightning_compress.functional.gptq.solve_columns`);
:func:`sparsegpt_reference` is the paper's algorithm as written, in float64, that the tests hold it to.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_compress.functional.gptq import (
    GPTQOptions,
    Pruning,
    ThreadPolicy,
    check_solver_inputs,
    solve_columns,
)
from lightning_compress.functional.masks import check_nm, check_sparsity, n_pruned, nm_mask, topk_mask
from lightning_compress.functional.quant import compute_qparams, dequantize, quant_range


class SparseGPTResult(NamedTuple):
    """Output of :func:`sparsegpt_prune` and :func:`sparsegpt_reference`.

    Attributes:
        weight: float32 ``(out, in)``, zero exactly where ``mask`` is False (and ``dequantize(codes, ...)`` when
            quantized).
        mask: bool keep-mask ``(out, in)``.
        codes: int8 ``(out, in)`` codes when quantized (a pruned weight's code is its zero-point), else None.
        scale, zero_point: float32 qparams ``(out, 1)`` per channel or ``(out, in / group_size)`` (static groups),
            else None.
        damp: the absolute dampening added to the Hessian's diagonal.
    """

    weight: Tensor
    mask: Tensor
    codes: Tensor | None
    scale: Tensor | None
    zero_point: Tensor | None
    damp: float


def _check(
    weight: Tensor, sparsity: float, nm: tuple[int, int] | None, options: GPTQOptions, quantize: bool
) -> Pruning:
    """The checks SparseGPT adds to GPTQ's; returns the :class:`Pruning`."""
    if nm is not None:
        check_nm(*nm)
        if weight.shape[1] % nm[1] or options.block_size % nm[1]:
            raise ValueError(
                f"nm={nm}: M={nm[1]} must divide in_features={weight.shape[1]} and block_size={options.block_size}"
            )
        sparsity = 1 - nm[0] / nm[1]
    else:
        check_sparsity(sparsity)
    if options.act_order:
        raise ValueError("act_order=True is not offered with pruning (masks follow the original column order)")
    if quantize and options.group_size is not None and not options.static_groups:
        raise ValueError(
            f"group_size={options.group_size} with pruning needs static_groups=True (group qparams up front); "
            "allowed: group_size=None (per channel) or static_groups=True"
        )
    return Pruning(float(sparsity), nm)


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    options: GPTQOptions | None = None,
    quantize: bool = False,
    threads: ThreadPolicy | None = None,
) -> SparseGPTResult:
    """Prune (and optionally quantize) a linear weight with SparseGPT; the fast solver (float32).

    Args:
        weight: ``(out, in)`` float weight.
        hessian: ``(in, in)`` Hessian sum from :func:`~lightning_compress.functional.gptq.hessian_update`.
        sparsity: unstructured: the fraction removed, in ``[0, 1)``, chosen per block of ``options.block_size``
            columns over all rows (``round(sparsity · out · block)`` per block). Ignored with ``nm``.
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of each row (``m`` divides ``in`` and
            ``options.block_size``).
        options: dampening and block size; with ``quantize`` also bits, symmetric and (static) groups
            (:class:`~lightning_compress.functional.gptq.GPTQOptions`). ``act_order`` is not offered.
        quantize: also round the kept weights onto the grid in the same pass (joint sparsity + quantization).
        threads: a thread policy, as for :func:`~lightning_compress.functional.gptq.gptq_quantize`.

    Returns:
        :class:`SparseGPTResult`.

    Raises:
        ValueError / TypeError: a bad argument (named). RuntimeError: the Hessian cannot be factorised.
    """
    options = check_solver_inputs(weight, hessian, options)
    pruning = _check(weight, sparsity, nm, options, quantize)
    w, codes, qp, damp, keep = solve_columns(weight, hessian, options, threads, quantize=quantize, pruning=pruning)
    return SparseGPTResult(w, keep, codes, qp.scale if qp else None, qp.zero_point if qp else None, damp)


def sparsegpt_reference(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    options: GPTQOptions | None = None,
    quantize: bool = False,
) -> SparseGPTResult:
    """SparseGPT as the paper's code computes it, in float64: the definition, slow.

    With ``U = Cholesky((H + λI)⁻¹)ᵀ`` (upper), for blocks ``[i1, i2)`` of ``block_size`` columns::

        unstructured: M = the round(sparsity · out · B) lowest W[:, i1:i2]² / U_jj² of the block (pruned)
        for each column j in the block:
            N:M, j % m == 0: in each row keep the n highest W[:, j:j+m]² / U_jj² (current weights)
            q = W[:, j] where kept else 0;  q = quant(q) when quantizing (qparams from the dense weight, up front)
            E[:, j - i1] = (W[:, j] - q) / U[j, j];  W[:, j:i2] -= E[:, j - i1] ⊗ U[j, j:i2]
        W[:, i2:] -= E · U[i1:i2, i2:]

    Args and returns as for :func:`sparsegpt_prune`.
    """
    options = check_solver_inputs(weight, hessian, options)
    pruning = _check(weight, sparsity, nm, options, quantize)
    w, h = weight.detach().double().clone(), hessian.detach().double().clone()
    dead = h.diagonal() == 0
    w[:, dead], h[dead, dead] = 0.0, 1.0
    rows, n = w.shape
    bits, group_size = options.bits, options.group_size
    if quantize:
        axis = 0 if group_size is None else None
        qp = compute_qparams(w.float(), bits, options.symmetric, axis, group_size, options.clip_search)
        scale = qp.scale.double().repeat_interleave(n // qp.scale.shape[1], dim=1)  # per column
        zero = qp.zero_point.double().repeat_interleave(n // qp.scale.shape[1], dim=1)
    damp = options.percdamp * h.diagonal().mean().item()
    h = h + damp * torch.eye(n, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H⁻¹ = UᵀU
    qmin, qmax = quant_range(bits)
    keep = torch.ones(rows, n, dtype=torch.bool)
    codes = torch.zeros(rows, n, dtype=torch.float64)
    for i1 in range(0, n, options.block_size):
        i2 = min(i1 + options.block_size, n)
        d = u.diagonal()[i1:i2]
        if pruning.nm is None:
            scores = w[:, i1:i2] ** 2 / d**2
            keep[:, i1:i2] = topk_mask(scores, scores.numel() - n_pruned(scores.numel(), pruning.sparsity))
        err = w.new_zeros(rows, i2 - i1)
        for j in range(i1, i2):
            if pruning.nm is not None and j % pruning.nm[1] == 0:
                m = pruning.nm[1]
                keep[:, j : j + m] = nm_mask(w[:, j : j + m] ** 2 / u.diagonal()[j : j + m] ** 2, *pruning.nm)
            q = w[:, j] * keep[:, j]
            if quantize:
                codes[:, j] = torch.round(q / scale[:, j] + zero[:, j]).clamp(qmin, qmax)
                q = (codes[:, j] - zero[:, j]) * scale[:, j]
            err[:, j - i1] = (w[:, j] - q) / u[j, j]
            w[:, j:i2] -= torch.outer(err[:, j - i1], u[j, j:i2])
            w[:, j] = q
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if not quantize:
        return SparseGPTResult(w.float(), keep, None, None, None, damp)
    c = codes.to(torch.int8)
    return SparseGPTResult(dequantize(c, qp.scale, qp.zero_point), keep, c, qp.scale, qp.zero_point, damp)
