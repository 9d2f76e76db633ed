"""Fused kernels of quantization-aware training: observer update and fake-quantization in one call.

Eagerly, one training step of a W8A8 fake-quant layer is some twenty small ops: the activation's min / max, the
running-range update, the scale and zero-point, the quantize-dequantize and its mask, then the weight's per-channel
min / max, scales and quantize-dequantize; each costs a dispatch, and on a small model the dispatches are the step.
On CPU each of the two is here one C++ call (``fused_kernels.cpp``, built once per machine by
``torch.utils.cpp_extension`` and cached), run under :class:`~lightning_compress.functional.quant.StraightThrough`
(the clipped straight-through backward: one multiply). ``torch.compile`` was measured first: its per-call overhead
(guards, wrappers) cost as much as the ops it fused.

The C++ kernels are the eager compositions op for op in float32 (IEEE division, round half to even, no fused
multiply-add), so QAT, its export and the eager reference agree bit for bit; the tests check this at rounding
boundaries. Other devices, or a machine where the build fails (no C++ compiler), run the eager compositions (after
one warning).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_compress.functional.quant import (
    StraightThrough,
    compute_qparams,
    expand_params,
    fake_quantize_and_mask,
    lsq_fake_quantize,
    qparams_from_range,
    quant_range,
    token_scale,
)

log = logging.getLogger(__name__)

EAGER_ENV = "LIGHTNING_COMPRESS_EAGER_QAT"  # set to 1: never build or use the C++ kernels


def _cpu_tag() -> str:
    """A short hash of the CPU's architecture and ISA flags: the kernels are built with ``-march=native``, so each
    kind of CPU gets its own build in torch's extension cache (a shared home directory never serves a binary built
    for another CPU)."""
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


@functools.cache
def _extension() -> Any | None:
    """The built C++ kernels, or None (disabled, or the build failed: warned once)."""
    if os.environ.get(EAGER_ENV) == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        here = Path(sys.executable).parent
        if shutil.which("ninja") is None and (here / "ninja").exists():  # PyPI's ninja (a dependency), off PATH
            os.environ["PATH"] = os.pathsep.join([str(here), os.environ.get("PATH", "")])
        source = Path(__file__).with_name("fused_kernels.cpp")
        return load(
            name=f"lightning_compress_fused_kernels_{_cpu_tag()}",
            sources=[str(source)],
            extra_cflags=["-O3", "-ffp-contract=off", "-march=native"],
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - no compiler or ninja: the eager path gives the same numbers
        log.warning("QAT's fused C++ kernels could not be built (%s: %s); running them eagerly", type(err).__name__,
                    (str(err).strip().splitlines() or [""])[-1][:200])  # fmt: skip
        return None


def _observe_eager(
    x: Tensor, min_val: Tensor, max_val: Tensor, num_batches: Tensor, bits: int, averaging_constant: float
) -> tuple[Tensor, Tensor]:
    """The eager composition the C++ kernel reproduces (``averaging_constant < 0``: running min / max)."""
    lo, hi = torch.aminmax(x)
    lo, hi = lo.float(), hi.float()
    if averaging_constant < 0:
        torch.minimum(min_val, lo, out=min_val)
        torch.maximum(max_val, hi, out=max_val)
    elif int(num_batches) == 0:
        min_val.copy_(lo)
        max_val.copy_(hi)
    else:
        min_val.add_(lo.sub(min_val).mul_(averaging_constant))
        max_val.add_(hi.sub(max_val).mul_(averaging_constant))
    num_batches.add_(1)
    scale, zero_point = qparams_from_range(min_val, max_val, bits, symmetric=False)
    return fake_quantize_and_mask(x, scale, zero_point, bits)


def _mask_grad(grad: Tensor, inside: Tensor) -> Tensor:
    """The straight-through backward ``grad * inside``, in one C++ pass on CPU."""
    ext = _extension() if grad.device.type == "cpu" else None
    return ext.straight_through_backward(grad, inside) if ext is not None else grad * inside


def _observe_kernel(x: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    ext = _extension() if x.device.type == "cpu" else None
    return (ext.observe_fake_quantize if ext is not None else _observe_eager)(x, *args)


_observe_kernel.backward = _mask_grad  # type: ignore[attr-defined]


def observe_fake_quantize(
    x: Tensor, min_val: Tensor, max_val: Tensor, num_batches: Tensor, bits: int, averaging_constant: float | None
) -> Tensor:
    """Update a per-tensor running range from ``x`` and fake-quantize ``x`` with it, asymmetric, in one kernel.

    Equal to ``MinMaxObserver`` (``averaging_constant=None``) or ``MovingAverageMinMaxObserver(c)`` observing ``x``,
    then :func:`~lightning_compress.functional.quant.qparams_from_range` of the updated range and
    :func:`~lightning_compress.functional.quant.fake_quantize`, forward and backward.

    Args:
        x: activations, any shape, not empty.
        min_val, max_val: 0-dim float32 running range, updated in place (``+inf`` / ``-inf`` before any data).
        num_batches: 0-dim int64 count of batches seen, incremented in place (0: EMA starts from this batch).
        bits: code width in ``[2, 8]``.
        averaging_constant: EMA weight of this batch ``c`` (``v <- v + c (v_batch - v)``), or None for min / max.

    Returns:
        ``x`` fake-quantized, of its shape and dtype; gradient straight through where not clipped.
    """
    quant_range(bits)  # validates bits
    c = -1.0 if averaging_constant is None else float(averaging_constant)
    return StraightThrough.apply(x, _observe_kernel, min_val, max_val, num_batches, bits, c)


def _minmax_eager(w: Tensor, bits: int, symmetric: bool, group: int) -> tuple[Tensor, Tensor]:
    """The eager composition the C++ kernel reproduces (``group``: values per scale, the row length per channel)."""
    group_size = None if group == w.numel() // w.shape[0] else group
    scale, zero_point = compute_qparams(w, bits, symmetric, axis=None if group_size else 0, group_size=group_size)
    z = None if symmetric else expand_params(zero_point, w.shape)
    return fake_quantize_and_mask(w, expand_params(scale, w.shape), z, bits)


def _minmax_kernel(w: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    ext = _extension() if w.device.type == "cpu" else None
    return (ext.minmax_fake_quantize if ext is not None else _minmax_eager)(w, *args)


_minmax_kernel.backward = _mask_grad  # type: ignore[attr-defined]


def minmax_fake_quantize(w: Tensor, bits: int, symmetric: bool = True, group_size: int | None = None) -> Tensor:
    """Fake-quantize a weight ``(out, in, ...)`` with min-max scales of its current values, in one kernel.

    Equal to ``fake_quantize(w, *compute_qparams(w, bits, symmetric, axis=0 or None, group_size))``, forward and
    backward: one scale (and zero-point) per output channel, or per ``group_size`` consecutive inputs.
    """
    quant_range(bits)  # validates bits
    return StraightThrough.apply(w, _minmax_kernel, bits, symmetric, _group(w, group_size))


def _group(w: Tensor, group_size: int | None) -> int:
    """Values per scale of weight ``w``: ``group_size``, or its row length (per channel); ValueError if it does not
    divide the row."""
    row = w.numel() // w.shape[0] if w.dim() >= 2 and w.shape[0] else 0
    group = group_size or row
    if not row or row % group:
        raise ValueError(f"group_size={group_size} must divide the weight's row length {row} (shape {tuple(w.shape)})")
    return group


class _FusedLSQ(torch.autograd.Function):
    """LSQ in one C++ pass each way (``lsq_forward`` / ``lsq_backward``); the backward recomputes ``x / S + Z`` from
    the weight instead of saving it."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group: int, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w, scale, *(() if zero is None else (zero,)))
        ctx.meta = (bits, group, grad_scale)
        return _extension().lsq_forward(w, scale, zero, bits, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w, scale, *zero = ctx.saved_tensors
        bits, group, grad_scale = ctx.meta
        dx, ds = _extension().lsq_backward(grad, w, scale, zero[0] if zero else None, bits, group, grad_scale)
        return dx, ds, None, None, None, None


def fused_lsq_fake_quantize(w: Tensor, scale: Tensor, bits: int, zero_point: Tensor | None = None) -> Tensor:
    """:func:`~lightning_compress.functional.quant.lsq_fake_quantize` of a weight ``(out, in, ...)`` with one scale per
    output channel or per group of inputs (``scale`` ``(out, in / group_size)``), in one C++ pass forward and one
    backward on CPU: the same forward bit for bit, the same gradients (the scale's summed in float64). Other devices,
    scale shapes, or no C++ build: the eager function."""
    quant_range(bits)  # validates bits
    row = w.numel() // w.shape[0] if w.dim() >= 2 and w.shape[0] else 0
    blocked = scale.dim() == 2 and scale.shape[0] == w.shape[0] and row and row % scale.shape[1] == 0
    if not blocked or w.device.type != "cpu" or _extension() is None:
        return lsq_fake_quantize(w, scale, bits, zero_point)
    _, qmax = quant_range(bits)
    zero = None if zero_point is None else zero_point.detach()
    return _FusedLSQ.apply(
        w, scale, zero, bits, row // scale.shape[1], 1.0 / (w.numel() // scale.numel() * qmax) ** 0.5
    )


class _InputAndWeight(torch.autograd.Function):
    """Both fused kernels of one layer under one autograd node (half the per-call overhead of two)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, act: tuple[Any, ...], weight: tuple[Any, ...]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        xq, x_inside = _observe_kernel(x, *act)
        wq, w_inside = _minmax_kernel(w, *weight)
        ctx.save_for_backward(x_inside, w_inside)
        for operand, out in ((x, xq), (w, wq)):
            if not operand.requires_grad:  # e.g. the model's input: no gradient (and no conv input-gradient) for it
                ctx.mark_non_differentiable(out)
        return xq, wq

    @staticmethod
    def backward(ctx, gx: Tensor | None, gw: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_inside, w_inside = ctx.saved_tensors
        dx = _mask_grad(gx, x_inside) if ctx.needs_input_grad[0] and gx is not None else None
        dw = _mask_grad(gw, w_inside) if ctx.needs_input_grad[1] and gw is not None else None
        return dx, dw, None, None


def observe_fake_quantize_input_and_weight(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    num_batches: Tensor,
    act_bits: int,
    averaging_constant: float | None,
    w: Tensor,
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A layer's two operands at once: :func:`observe_fake_quantize` of its input ``x`` and
    :func:`minmax_fake_quantize` of its weight ``w`` (same arguments, same results), as one autograd node."""
    quant_range(act_bits), quant_range(bits)  # validate
    c = -1.0 if averaging_constant is None else float(averaging_constant)
    group = _group(w, group_size)
    return _InputAndWeight.apply(x, w, (min_val, max_val, num_batches, act_bits, c), (bits, symmetric, group))


def kernels_built() -> bool:
    """Whether the C++ kernels are built and in use (False: eager compositions, same numbers)."""
    return _extension() is not None


def quantize_rows_u8(x: Tensor, bits: int, smooth: Tensor | None = None, kernel: bool = True) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-row codes of ``x (M, K)`` shifted to uint8, as oneDNN's int8 matmul takes them.

    With SmoothQuant's divisor ``x <- x / smooth`` (in ``x``'s dtype) first; ``S_t = max|x_t| / qmax``
    (:func:`~lightning_compress.functional.quant.token_scale`), ``u = clamp(round(x / S_t), qmin, qmax) + 128``: one
    C++ pass on CPU when the kernels are built, else :func:`quantize_rows_u8_eager` (the same numbers).

    Returns:
        ``u`` uint8 ``(M, K)`` and ``S`` float32 ``(M, 1)``.
    """
    ext = _extension()
    if ext is not None and x.device.type == "cpu" and x.dim() == 2:
        return tuple(ext.quantize_rows_u8(x, bits, smooth))  # type: ignore[return-value]
    return quantize_rows_u8_eager(x, bits, smooth)


def quantize_rows_u8_eager(x: Tensor, bits: int, smooth: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows_u8` as torch ops (what ``torch.compile`` fuses best for many rows)."""
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    qmin, qmax = quant_range(bits)
    s = token_scale(x, bits)
    return (torch.clamp(torch.round(x.float() / s), qmin, qmax) + 128).to(torch.uint8), s


def scale_rows(y: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``y (M, N) * scale (M, 1) + bias (N,)`` in ``dtype``: the per-token rescale after an integer matmul run with
    unit input scales (one C++ pass on CPU when built, else :func:`scale_rows_eager`; the same numbers)."""
    ext = _extension()
    if ext is not None and y.device.type == "cpu" and y.dim() == 2 and y.dtype == torch.float32:
        return ext.scale_rows(y, scale, bias, dtype)
    return scale_rows_eager(y, scale, bias, dtype)


def scale_rows_eager(y: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """:func:`scale_rows` as torch ops."""
    y = y * scale
    return (y if bias is None else y + bias).to(dtype)
