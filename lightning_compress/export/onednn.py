"""oneDNN's quantized int8 matmul and convolution on x86 CPUs (AMX / AVX512-VNNI / AVX2), through torch's ops.

``torch.ops.onednn.qlinear_prepack`` reorders int8 weight codes once into oneDNN's blocked layout (an opaque
tensor, cached by the layer and rebuilt after a move or a state-dict load); ``qlinear_pointwise`` then computes
``y = ((u - Z_u) · W_q^T) S_x S_w + b`` with exact int32 accumulation, the rescale, bias and output dtype in its
epilogue. This is what PyTorch's x86 inductor quantization lowers to. oneDNN takes unsigned 8-bit activations
(its signed-activation path is a slow reference loop), so signed codes ``q`` are shifted: ``u = q + 128`` with
zero-point ``Z_u = Z + 128``, which leaves the product exact. ``qconv_prepack`` / ``qconv2d_pointwise`` do the
same for 2-D convolutions.

Dynamic per-token activations run the matmul with ``S_x = 1`` and multiply each row by its own scale afterwards
(oneDNN's epilogue takes one input scale); static activations (a calibrated scale and zero-point) are fused
entirely.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_compress.functional.quant import quant_range

ONEDNN = "onednn"
U8_SHIFT = 128  # signed codes q -> unsigned u = q + 128 (oneDNN's fast activation type)
# Up to this many rows the per-token quantize and rescale run as one C++ pass each (no compiled-call overhead:
# decoding); above it, compiled (inductor's vectorised loops are faster on many rows).
KERNEL_ROWS = 128
# Output dtypes oneDNN's epilogue writes directly; others are computed in float32 and cast.
OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


def _ops_reason() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (mkldnn)"
    missing = [n for n in ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack", "qconv2d_pointwise")
               if not hasattr(torch.ops.onednn, n)]  # fmt: skip
    return f"this torch has no torch.ops.onednn.{missing[0]}" if missing else None


@functools.cache
def onednn_unsupported_reason() -> str | None:
    """Why oneDNN's int8 kernels cannot run on this CPU (None when they can): no oneDNN in this torch, or a probe
    matmul that is not exact (an ISA oneDNN has no int8 kernel for)."""
    reason = _ops_reason()
    if reason is not None:
        return reason
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (16, 64), generator=gen, dtype=torch.int8)
    q = torch.randint(-127, 128, (3, 64), generator=gen, dtype=torch.int8)
    try:
        y = qlinear(shift_u8(q), 1.0, U8_SHIFT, prepack_linear(codes), torch.ones(16), None, torch.float32)
    except RuntimeError as err:
        return f"oneDNN's int8 linear failed on this CPU: {str(err).splitlines()[0]}"
    exact = q.long() @ codes.long().t()
    if not torch.equal(y.double(), exact.double()):
        return "oneDNN's int8 linear gave inexact results on this CPU (probe)"
    return None


def shift_u8(q: Tensor) -> Tensor:
    """int8 codes ``q`` as oneDNN's ``uint8`` ``q + 128``."""
    return (q.to(torch.int16) + U8_SHIFT).to(torch.uint8)


def prepack_linear(codes: Tensor) -> Tensor:
    """int8 codes ``(out, in)`` in oneDNN's layout (an opaque CPU tensor; a row-count hint made no difference)."""
    return torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)


def qlinear(
    u: Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``((u - x_zero_point) · W_q^T) x_scale S_w + b`` for ``u`` uint8 ``(M, K)``, ``packed`` from
    :func:`prepack_linear`, ``weight_scale`` float32 ``(N,)``: ``(M, N)`` in ``out_dtype`` (float32 / bfloat16).
    """
    zeros = _zeros(weight_scale.shape[0])
    return torch.ops.onednn.qlinear_pointwise(
        u, x_scale, x_zero_point, packed, weight_scale, zeros, bias, 1.0, 0, out_dtype, "none", [], ""
    )


@functools.cache
def _zeros(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.int64)


def quantize_static_u8(x: Tensor, bits: int, scale: float, zero_point: float, smooth: Tensor | None) -> Tensor:
    """Static codes ``clamp(round(x / S + Z), qmin, qmax) + 128`` of ``x`` (after ``x / smooth``) as uint8."""
    qmin, qmax = quant_range(bits)
    xs = x if smooth is None else x / smooth.to(x.dtype)
    return (torch.clamp(torch.round(xs.float() / scale + zero_point), qmin, qmax) + U8_SHIFT).to(torch.uint8)


def prepack_conv(
    codes: Tensor,
    weight_scale: Tensor,
    x_scale: float,
    x_zero_point: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """int8 conv codes ``(out, in / groups, kh, kw)`` in oneDNN's layout for a fixed input quantization."""
    return torch.ops.onednn.qconv_prepack(
        codes.contiguous(), weight_scale, x_scale, x_zero_point, list(stride), list(padding), list(dilation), groups
    )


def qconv2d(
    u: Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """The 2-D convolution of uint8 ``u (N, C, H, W)`` with the prepacked codes: ``conv(u - Z_u, W_q) S_x S_w + b``
    with int32 accumulation, ``(N, out, H', W')`` in ``out_dtype``."""
    zeros = _zeros(weight_scale.shape[0])
    return torch.ops.onednn.qconv2d_pointwise(
        u, x_scale, x_zero_point, packed, weight_scale, zeros, bias, list(stride), list(padding), list(dilation),
        groups, 1.0, 0, out_dtype, "none", [], None,
    )  # fmt: skip
