"""Linear (affine) quantization: quantization parameters, quantize, dequantize, fake-quantize.

A real value r and its integer code q are related by ``r = S * (q - Z)`` with scale ``S`` and zero-point ``Z``.
Codes are signed N-bit integers in ``[qmin, qmax] = [-2^(N-1), 2^(N-1) - 1]``, N in 2..8, stored as int8.

FP8 (``method="fp8"``, Micikevicius et al. 2022, "FP8 Formats for Deep Learning") is the other grid: codes are
``torch.float8_e4m3fn`` values, ``r = S * q`` with ``q = fp8_e4m3(r / S)`` the nearest E4M3 value, saturated at
``±FP8_MAX = ±448``, and ``S = max|r| / 448`` per block (symmetric: no zero-point). Every function here that
rounds takes ``method`` (``"linear"``, the integer grid, or ``"fp8"``); the granularity rules are the same.

Granularity is one code path: the scale and zero-point have the same number of dimensions as the tensor,
and along each dimension either one value (shared), one value per index, or one value per block of
``size // params_size`` consecutive indices. Per-tensor, per-channel (any axis) and per-group are three
block shapes of that one rule (see :func:`group_shape`). Tensors with more than two dimensions quantized per
group are grouped along their flattened input dimension ``prod(shape[1:])`` (a conv weight as ``(out, in*kh*kw)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

MIN_BITS = 2
MAX_BITS = 8
# Smallest scale we ever produce: a constant or all-zero block gets this instead of 0, so r / S stays finite.
MIN_SCALE = 1e-12
# The clipping search (the GPTQ reference's ``mse`` quantizer): shrink factors 1, 0.99, ... down to 1 - CLIP_MAX_SHRINK
# in CLIP_GRID steps, error measured as sum |x - fake_quant(x)|^CLIP_NORM per block.
CLIP_GRID = 100
CLIP_MAX_SHRINK = 0.8
CLIP_NORM = 2.4
# The grids a value can be rounded onto: signed integers of ``bits`` bits, or FP8 E4M3 (8 bits).
METHODS = ("linear", "fp8")
# Storage dtypes a scale can be rounded to as it is made (``scale_dtype``): a file format that stores fp16 scales
# (GGUF's blocks) then holds exactly the scales the codes were rounded with.
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448: the largest finite E4M3 value


class QParams(NamedTuple):
    """Scale and zero-point of a linear quantizer, in block shape (same ndim as the tensor, or 2-D per group)."""

    scale: Tensor
    zero_point: Tensor


def check_bits(bits: int, name: str = "bits") -> int:
    """Validate a bit width.

    Args:
        bits: number of bits, an ``int`` in ``[2, 8]``.
        name: the parameter name used in the error message.

    Returns:
        ``bits`` unchanged.

    Raises:
        TypeError: ``bits`` is not an int. ValueError: outside ``[2, 8]``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return bits


def check_method(method: str, bits: int, symmetric: bool = True) -> str:
    """Validate a grid: ``method`` in :data:`METHODS`; ``"fp8"`` needs ``bits=8`` and ``symmetric=True``.

    Raises:
        ValueError: naming the bad argument and what is allowed.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a grid; allowed: {list(METHODS)}")
    if method == "fp8" and (bits != 8 or symmetric is not True):
        raise ValueError(f"method='fp8' (E4M3) has 8 bits and no zero-point; got bits={bits}, symmetric={symmetric}")
    return method


def fp8_e4m3(x: Tensor) -> Tensor:
    """``x`` cast to ``torch.float8_e4m3fn`` with saturation: the nearest E4M3 value (ties to even), ``|x| > 448``
    (inf included) to ``±448``; NaN stays NaN. Any shape; the result has ``x``'s shape."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def grid_max(bits: int, method: str = "linear") -> float:
    """The largest code magnitude a symmetric scale maps ``max|x|`` onto: ``2^(bits-1) - 1``, or 448 for FP8."""
    return FP8_MAX if method == "fp8" else float(quant_range(bits)[1])


def round_to_grid(v: Tensor, bits: int, method: str = "linear") -> Tensor:
    """``v`` (already ``x / S + Z``) rounded onto the grid, float32: ``clamp(round(v), qmin, qmax)``, or the
    saturated nearest FP8 E4M3 value (:func:`fp8_e4m3`)."""
    if method == "fp8":
        return fp8_e4m3(v).float()
    qmin, qmax = quant_range(bits)
    return torch.clamp(torch.round(v), qmin, qmax)


def quant_range(bits: int) -> tuple[int, int]:
    """Signed integer range of an N-bit code: ``(-2^(N-1), 2^(N-1) - 1)``; e.g. 8 -> (-128, 127)."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_shape(
    shape: tuple[int, ...] | torch.Size, axis: int | None = None, group_size: int | None = None
) -> tuple[int, ...]:
    """Block shape that one scale covers, for a tensor of ``shape``.

    Args:
        shape: the tensor's shape.
        axis: ``None`` for per-tensor; an axis (negative allowed) for one scale per index along it.
        group_size: one scale per ``group_size`` consecutive inputs of each output row (per-group); the tensor is
            viewed as ``(shape[0], prod(shape[1:]))``, so the returned block is 2-D. Exclusive with ``axis``.

    Returns:
        Per-tensor ``shape``; per-channel ``shape`` with 1 at ``axis``; per-group ``(1, group_size)``.

    Raises:
        ValueError: an axis out of range, both options given, or a group size that does not divide the input
            dimension.
    """
    shape = tuple(shape)
    if axis is not None and group_size is not None:
        raise ValueError(f"give axis or group_size, not both (axis={axis}, group_size={group_size})")
    if group_size is not None:
        if len(shape) < 2:
            raise ValueError(f"group_size needs a tensor of at least 2 dims, got shape {shape}")
        in_features = math.prod(shape[1:])
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if in_features % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the input dimension {in_features} of shape {shape}; "
                f"allowed: a divisor of {in_features}"
            )
        return (1, group_size)
    if axis is None:
        return shape
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis={axis} is out of range for a tensor of shape {shape}")
    axis %= len(shape)
    return tuple(1 if d == axis else s for d, s in enumerate(shape))


def _blocked(x: Tensor, block: tuple[int, ...]) -> Tensor:
    """View ``x`` as ``(n0, b0, n1, b1, ...)`` so that reducing the odd dims reduces each block."""
    if len(block) == 2 and x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    dims: list[int] = []
    for size, b in zip(x.shape, block, strict=True):
        dims += [size // b, b]
    return x.reshape(dims)


def expand_params(p: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Broadcast block-shaped parameters ``p`` to a tensor of ``shape``.

    Along each dimension ``p`` has size 1 (broadcast), the full size (no copy), or ``size / block`` (repeated
    ``block`` times). A 2-D ``p`` for a tensor of more dims addresses its flattened ``(shape[0], -1)`` view.
    A 0-dim ``p`` is per-tensor and broadcasts as it is.
    """
    if p.dim() == 0:
        return p
    shape = tuple(shape)
    flat = p.dim() == 2 and len(shape) > 2
    target = (shape[0], math.prod(shape[1:])) if flat else shape
    if flat and p.shape[1] == 1:  # per row: broadcast over the trailing dims
        return p.reshape((shape[0],) + (1,) * (len(shape) - 1))
    if p.dim() != len(target):
        raise ValueError(f"parameters of shape {tuple(p.shape)} do not fit a tensor of shape {shape}")
    for d, (ps, ts) in enumerate(zip(p.shape, target, strict=True)):
        if ps not in (1, ts):
            if ts % ps:
                raise ValueError(f"parameters of shape {tuple(p.shape)} do not tile a tensor of shape {shape}")
            p = p.repeat_interleave(ts // ps, dim=d)
    return p.reshape(shape) if flat else p


def check_scale_dtype(scale_dtype: str | None) -> str | None:
    """Validate ``scale_dtype``: None (float32 scales) or a key of :data:`SCALE_DTYPES`; ValueError otherwise."""
    if scale_dtype is not None and scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype!r} is not supported; allowed: None or {list(SCALE_DTYPES)}")
    return scale_dtype


def qparams_from_range(
    rmin: Tensor,
    rmax: Tensor,
    bits: int,
    symmetric: bool = True,
    method: str = "linear",
    scale_dtype: str | None = None,
) -> QParams:
    """Scale and zero-point that map ``[rmin, rmax]`` onto the signed N-bit range (or the FP8 range).

    Symmetric: ``Z = 0, S = max(|rmin|, |rmax|) / qmax`` (FP8: ``/ 448``). Asymmetric: the range is first widened
    to contain 0 (so that 0 is exactly representable: padding, ReLU zeros and pruned weights stay exact), then
    ``S = (rmax - rmin) / (qmax - qmin)``, ``Z = round(qmin - rmin / S)``.
    A zero-width range (a constant or all-zero block) gets ``S = MIN_SCALE`` instead of 0: finite, never NaN.
    With ``scale_dtype``, ``S`` is rounded to that dtype's nearest value (at least its smallest normal) before
    ``Z`` is taken from it, so the codes are exact for a format that stores scales in it.

    Args:
        rmin, rmax: per-block minima and maxima, any (equal) shape.
        bits: code width in ``[2, 8]``.
        symmetric: symmetric (``Z = 0``) or asymmetric.
        method: ``"linear"`` or ``"fp8"`` (symmetric only).
        scale_dtype: None, ``"float16"`` or ``"bfloat16"`` (see above).

    Returns:
        ``QParams(scale, zero_point)`` float32 tensors of the shape of ``rmin``; ``zero_point`` holds integers.
    """
    qmin, qmax = quant_range(bits)
    check_method(method, bits, symmetric)
    if symmetric:  # max(|rmin|, |rmax|) needs no widening to 0
        scale = torch.maximum(rmin.float().neg(), rmax.float()).div_(grid_max(bits, method))
        scale = _stored(scale.clamp_(min=MIN_SCALE), scale_dtype)
        return QParams(scale, torch.zeros_like(scale))
    rmin = rmin.float().clamp(max=0.0)
    rmax = rmax.float().clamp(min=0.0)
    scale = _stored(((rmax - rmin) / (qmax - qmin)).clamp(min=MIN_SCALE), scale_dtype)
    zero_point = torch.round(qmin - rmin / scale).clamp(qmin, qmax)
    return QParams(scale, zero_point)


def _stored(scale: Tensor, scale_dtype: str | None) -> Tensor:
    """``scale`` rounded to ``scale_dtype`` (at least its smallest normal), back in float32; itself for None."""
    if scale_dtype is None:
        return scale
    dtype = SCALE_DTYPES[check_scale_dtype(scale_dtype)]
    return scale.clamp(min=torch.finfo(dtype).tiny).to(dtype).float()


def compute_qparams(
    x: Tensor,
    bits: int,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
    clip_search: bool = False,
    method: str = "linear",
    scale_dtype: str | None = None,
    clip_grid: int = CLIP_GRID,
) -> QParams:
    """Quantization parameters of ``x`` at the chosen granularity: min-max, or with the clipping search.

    The clipping search (Frantar et al.'s GPTQ reference quantizer, ``mse=True``) tries each block's range shrunk by
    ``p = 1, 0.99, ..., 0.21`` (``[p·min, p·max]``) and keeps, per block, the ``p`` with the least
    ``Σ |x - fake_quant(x)|^2.4``: clipping a few outliers buys a finer grid for the rest (matters at 3-4 bits).

    Args:
        x: the tensor to quantize, any shape (a weight is ``(out, in, ...)``).
        bits: code width in ``[2, 8]``.
        symmetric: symmetric (``Z = 0``) or asymmetric (see :func:`qparams_from_range`).
        axis: ``None`` per-tensor, else one scale per index along ``axis`` (0 = per output channel).
        group_size: one scale per ``group_size`` consecutive inputs of each output row.
        clip_search: search the clipping range per block instead of min-max.
        method: the grid, ``"linear"`` (integers) or ``"fp8"`` (E4M3, symmetric 8-bit).
        scale_dtype: round the scales to ``"float16"`` / ``"bfloat16"`` as they are made (None: float32).
        clip_grid: the clipping search's steps per unit of shrink (100: ``p = 1, 0.99, ...``; 25: ``1, 0.96, ...``,
            a quarter of the work).

    Returns:
        ``QParams`` in block shape: per-tensor ``(1,)*ndim``; per-channel ``shape`` with 1 everywhere but ``axis``;
        per-group ``(out, in / group_size)``.
    """
    block = group_shape(x.shape, axis, group_size)
    blocks = _blocked(x.detach(), block)
    n = blocks.dim() // 2
    params_shape = blocks.shape[0::2]
    # (n0, n1, ..., b0, b1, ...) flattened to (blocks, values per block)
    grouped = blocks.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2)).reshape(math.prod(params_shape), -1)
    rmin, rmax = grouped.amin(dim=1), grouped.amax(dim=1)  # (aminmax with dim is ~15x slower on CPU)
    if not clip_search:
        lo, hi = rmin.reshape(params_shape), rmax.reshape(params_shape)
        return qparams_from_range(lo, hi, bits, symmetric, method, scale_dtype)
    best = qparams_from_range(rmin, rmax, bits, symmetric, method, scale_dtype)
    values = grouped.float()
    best_err = torch.full_like(rmin, math.inf, dtype=torch.float32)
    for i in range(int(CLIP_MAX_SHRINK * clip_grid)):
        p = 1 - i / clip_grid
        qp = qparams_from_range(p * rmin, p * rmax, bits, symmetric, method, scale_dtype)
        s, z = qp.scale[:, None], qp.zero_point[:, None]
        err = (values - (round_to_grid(values / s + z, bits, method) - z) * s).abs_().pow_(CLIP_NORM).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(torch.where(better, qp.scale, best.scale), torch.where(better, qp.zero_point, best.zero_point))
    return QParams(best.scale.reshape(params_shape), best.zero_point.reshape(params_shape))


def token_scale(x: Tensor, bits: int, method: str = "linear") -> Tensor:
    """Dynamic symmetric per-token scales of activations ``x (..., in)``: ``max|x| / qmax`` along the last dim
    (FP8: ``/ 448``).

    Returns:
        float32 ``(..., 1)``, at least ``1e-8`` (an all-zero token gets a finite scale).
    """
    top = grid_max(bits, method)
    return x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / top


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, method: str = "linear") -> Tensor:
    """Quantize: ``q = clamp(round(r / S + Z), qmin, qmax)`` as int8, or (FP8) ``q = fp8_e4m3(r / S)``.

    Args:
        x: float tensor, any shape.
        scale, zero_point: block-shaped parameters (see :func:`compute_qparams`); FP8's zero-point is 0.
        bits: code width in ``[2, 8]``.
        method: ``"linear"`` or ``"fp8"``.

    Returns:
        int8 (FP8: ``torch.float8_e4m3fn``) tensor of ``x``'s shape.
    """
    s = expand_params(scale, x.shape)
    if method == "fp8":
        return fp8_e4m3(x.float() / s)
    z = expand_params(zero_point, x.shape)
    return round_to_grid(x.float() / s + z, bits).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Dequantize: ``r = S * (q - Z)`` as float32, ``q`` integer (or FP8) codes and block-shaped parameters."""
    s = expand_params(scale, q.shape)
    z = expand_params(zero_point, q.shape)
    return (q.float() - z) * s


def fake_quantize_and_mask(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, method: str = "linear"
) -> tuple[Tensor, Tensor]:
    """The fake-quantize forward and its straight-through mask, parameters already broadcastable to ``x``.

    Returns:
        ``S * (clamp(round(x / S + Z), qmin, qmax) - Z)`` in ``x``'s dtype (computed in float32; ``zero_point=None``
        is symmetric and skips two passes), and bool ``round(x / S + Z) in [qmin, qmax]`` (the clamp changed
        nothing), both of ``x``'s shape. FP8: ``S * fp8_e4m3(x / S)`` and ``|x / S| <= 448``.
    """
    if method == "fp8":
        v = x.float() / scale
        return fp8_e4m3(v).float().mul_(scale).to(x.dtype), v.abs() <= FP8_MAX
    qmin, qmax = quant_range(bits)
    v = x.float() / scale
    if zero_point is not None:
        v.add_(zero_point)
    v.round_()
    codes = v.clamp(qmin, qmax)
    inside = v == codes
    if zero_point is not None:
        codes.sub_(zero_point)
    return codes.mul_(scale).to(x.dtype), inside


class StraightThrough(torch.autograd.Function):
    """``y, inside = kernel(x, *args)`` forward; clipped straight-through backward ``dL/dx = dL/dy * inside``.

    ``kernel`` is any quantize-dequantize returning the output and the mask of the values it did not clip: the
    eager :func:`fake_quantize_and_mask`, or a fused kernel (:mod:`~lightning_compress.functional.fused`, which
    also gives the backward multiply as ``kernel.backward``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Callable[..., tuple[Tensor, Tensor]], *args: Any) -> Tensor:  # type: ignore[override]
        y, inside = kernel(x, *args)
        ctx.save_for_backward(inside)
        ctx.n_args, ctx.mask_grad = len(args), getattr(kernel, "backward", None)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        masked = ctx.mask_grad(grad, inside) if ctx.mask_grad is not None else grad * inside
        return (masked, None, *([None] * ctx.n_args))


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, method: str = "linear") -> Tensor:
    """Quantize then dequantize in one op, differentiable by the straight-through estimator (STE).

    Forward: ``S * (clamp(round(x / S + Z), qmin, qmax) - Z)``, bit-for-bit equal to
    ``dequantize(quantize(x))`` (in float32; cast back to ``x.dtype``).
    Backward: ``dL/dx = dL/dy`` where the code was inside ``[qmin, qmax]`` and **0 where it was clipped**
    (the clipped STE of Bengio et al. 2013 / Jacob et al. 2018, as torch's FakeQuantize): values outside the
    representable range get no gradient that would push them further out. No gradient flows to the scale or
    zero-point here (learned scales are LSQ, :func:`lsq_fake_quantize`).

    Args:
        x: float tensor, any shape.
        scale, zero_point: block-shaped parameters (see :func:`compute_qparams`); ``zero_point=None`` means
            symmetric (``Z = 0``) and skips its two passes.
        bits: code width in ``[2, 8]``.
        method: ``"linear"``, or ``"fp8"``: forward ``S * fp8_e4m3(x / S)``, gradient 0 where ``|x / S| > 448``.

    Returns:
        Tensor of ``x``'s shape and dtype whose values lie on the quantization grid.
    """
    s = expand_params(scale, x.shape).detach()
    z = None if zero_point is None or method == "fp8" else expand_params(zero_point, x.shape).detach()
    return StraightThrough.apply(x, fake_quantize_and_mask, s, z, bits, method)


def reduce_to_params(t: Tensor, params_shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Sum a tensor over each parameter block: the adjoint of :func:`expand_params` (gradients of block scales).

    Args:
        t: a tensor of the quantized tensor's shape.
        params_shape: the block-shaped parameters' shape.

    Returns:
        Tensor of ``params_shape``: each entry the sum of ``t`` over its block.
    """
    flat = t.reshape(t.shape[0], -1) if len(params_shape) == 2 and t.dim() > 2 else t
    block = tuple(s // p for s, p in zip(flat.shape, params_shape, strict=True))
    return _blocked(flat, block).sum(dim=tuple(range(1, 2 * flat.dim(), 2)))


class _LSQ(torch.autograd.Function):
    """Fake-quantization with a learned step size and a fixed zero-point; exact forward, LSQ backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, grad_scale: float) -> Tensor:  # type: ignore[override]
        qmin, qmax = quant_range(bits)
        s = expand_params(scale, x.shape)
        z = None if zero_point is None else expand_params(zero_point, x.shape)
        v = x.float() / s if z is None else x.float() / s + z
        codes = torch.clamp(torch.round(v), qmin, qmax)
        ctx.save_for_backward(v, codes, z if z is not None else torch.zeros(()))
        ctx.meta = (qmin, qmax, grad_scale, tuple(scale.shape))
        return ((codes if z is None else codes - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:  # type: ignore[override]
        v, codes, z = ctx.saved_tensors
        qmin, qmax, grad_scale, scale_shape = ctx.meta
        inside = (v >= qmin) & (v <= qmax)
        dscale = torch.where(inside, codes - v, codes - z)  # round(u) - u inside; qmin/qmax - Z where clipped
        grad_scale_t = reduce_to_params(grad.float() * dscale, scale_shape) * grad_scale
        return grad * inside, grad_scale_t, None, None, None


def lsq_fake_quantize(x: Tensor, scale: Tensor, bits: int, zero_point: Tensor | None = None) -> Tensor:
    """Learned step size quantization (LSQ, Esser et al. 2020), symmetric or with a fixed zero-point.

    With ``u = x / S + Z`` (``Z = 0`` when ``zero_point`` is None): forward ``S * (clamp(round(u), qmin, qmax) - Z)``,
    bit-for-bit ``dequantize(quantize(x, S, Z))``. Backward: ``dL/dx`` straight through inside the range (0 where
    clipped); ``dL/dS`` per block is ``g * sum(dL/dy * (round(u) - u))`` inside and ``qmin - Z`` / ``qmax - Z`` in
    place of the bracket where clipped, with the LSQ gradient scale ``g = 1 / sqrt(n * qmax)``, ``n`` the number of
    values per scale. The zero-point gets no gradient: it stays the integer it was given (a PTQ start's, or min-max's).

    Args:
        x: float tensor, any shape.
        scale: learnable block-shaped scales (see :func:`compute_qparams`), positive.
        bits: code width in ``[2, 8]``.
        zero_point: integer-valued block-shaped zero-points of ``scale``'s shape, or None (symmetric).

    Returns:
        Tensor of ``x``'s shape and dtype on the quantization grid.
    """
    _, qmax = quant_range(bits)
    per_scale = x.numel() // scale.numel()
    zero = None if zero_point is None else zero_point.detach()
    return _LSQ.apply(x, scale, zero, bits, 1.0 / math.sqrt(per_scale * qmax))


def sqnr_db(x: Tensor, y: Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``y`` as an approximation of ``x``: ``20·log10(‖x‖ / ‖x − y‖)`` in dB.

    Computed in float64 over all values (any shape, the same for both). ``inf`` when ``y == x`` exactly.
    Example: ``x = [3, 4], y = [3, 3]`` gives ``20·log10(5 / 1) = 13.979...``.

    Raises:
        ValueError: the shapes differ.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    x64, y64 = x.detach().double().flatten(), y.detach().double().flatten()
    noise, signal = float((x64 - y64).norm()), float(x64.norm())
    if noise == 0.0:
        return math.inf
    return 20.0 * math.log10(signal / noise) if signal > 0 else -math.inf
