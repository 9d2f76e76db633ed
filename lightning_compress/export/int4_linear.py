"""Int4 weight-only Linear: packed signed 4-bit codes with per-group (or per-channel) float32 scales.

The weight is ``W = S * (q - Z)`` with codes ``q`` in ``[-8, 7]``, one scale ``S`` (and, asymmetric, one zero-point
``Z``) per group of ``group_size`` consecutive inputs of each output row: exactly what
``WeightQuantizer(bits=4, group_size=g)`` produces, so :meth:`Int4Linear.dequantized_weight` is bit-for-bit the
weight a converted ``FakeQuantLinear`` computes with. The codes are stored two to a byte (``pack_bits(q + 8, 4)``).

Kernels: ``"reference"`` (dequantize, then ``F.linear``), ``"float"`` (a cached dequantized weight) and ``"int4"``,
torch's packed int4 matmul (tinygemm on CUDA, ``_weight_int4pack_mm_for_cpu`` on CPU). Both compute
``w = (u - 8) * scale + zero`` with ``u = q + 8`` the unsigned code, so a layer maps onto them with
``scale = S`` and ``zero = -Z * S``, laid out as ``scales_and_zeros (in / kernel_group, out, 2)``. The kernels
take group sizes 32, 64, 128 and 256 only; a layer group that is a multiple of one of them (per-channel included)
runs with that kernel group and its scales repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.export.layer import FLOAT, REFERENCE, ExportedLinear, float_bias
from lightning_compress.functional.packing import pack_bits, unpack_bits
from lightning_compress.functional.quant import dequantize, quant_range
from lightning_compress.nn.quantized import QuantizedLayer, QuantizedWeight, round_to_nearest

INT4 = "int4"
BITS = 4
QMIN, QMAX = quant_range(BITS)
# Group sizes torch's int4 matmuls accept (CPU and CUDA), largest first.
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# Activation dtypes the CPU kernel computes in directly (scales and zeros are cast to the input's dtype).
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPEC_KEYS = ("in_features", "out_features", "group_size", "symmetric", "bias")


def kernel_group_size(group_size: int) -> int | None:
    """The largest group size of torch's int4 kernels dividing ``group_size`` (None when there is none).

    A layer group ``g`` runs as ``g / kg`` kernel groups of ``kg`` inputs with repeated scales, exactly the same
    weight; e.g. per-channel over 4096 inputs -> 256, ``g = 96`` -> 32, ``g = 16`` -> None.
    """
    return next((kg for kg in KERNEL_GROUP_SIZES if group_size % kg == 0), None)


def cuda_inner_k_tiles(in_features: int) -> int | None:
    """tinygemm's ``inner_k_tiles`` for ``in_features``: the largest of 8, 4, 2 with ``in % (tiles * 16) == 0``."""
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


@dataclass
class Int4KernelCache:
    """What the ``"int4"`` kernel needs: the weight in the kernel's packed layout and its scales and zeros.

    Attributes:
        weight: CPU ``uint8 (out, in / 2)`` from ``_convert_weight_to_int4pack_for_cpu``; CUDA ``int32
            (out / 8, in / (tiles * 16), 32, tiles / 2)`` from ``_convert_weight_to_int4pack``.
        group_size: the kernel's group size (32, 64, 128 or 256).
        scales_and_zeros: float32 ``(in / group_size, out, 2)``: ``[..., 0] = S``, ``[..., 1] = -Z * S``.
        by_dtype: ``scales_and_zeros`` cast to each compute dtype used so far.
    """

    weight: Tensor
    group_size: int
    scales_and_zeros: Tensor
    by_dtype: dict[torch.dtype, Tensor] = field(default_factory=dict)

    def scales_and_zeros_as(self, dtype: torch.dtype) -> Tensor:
        """``scales_and_zeros`` in ``dtype`` (the kernels want them in the activation dtype), cached."""
        if dtype not in self.by_dtype:
            self.by_dtype[dtype] = self.scales_and_zeros.to(dtype).contiguous()
        return self.by_dtype[dtype]


class Int4Linear(ExportedLinear):
    """Int4 weight-only Linear: ``y = x W^T + b`` with ``W = S * (q - Z)``, ``(..., in) -> (..., out)``.

    Persistent buffers (all ``state_dict`` holds): ``packed`` uint8 ``(out, in / 2)`` = ``pack_bits(q + 8, 4)``;
    ``scale`` float32 ``(out, in / group_size)``; ``zero_point`` float32 of the same shape (asymmetric only);
    ``bias`` float32 ``(out,)`` (when the layer has one). Storage is ``in / 2`` bytes per row plus 4 (8
    asymmetric) bytes per group: about 0.133 of float32 at group size 128.

    Args:
        codes: int8 ``(out, in)`` signed 4-bit codes in ``[-8, 7]`` (``quantize(w, S, Z, bits=4)``); ``in`` even.
        scale: positive float ``(out, in / group_size)``; ``(out, 1)`` is per-channel (``group_size = in``).
        zero_point: integer-valued ``Z`` of ``scale``'s shape, or None for symmetric (``Z = 0``).
        bias: ``(out,)`` or None.
        group_size: inputs per scale, a divisor of ``in``; None means per-channel (``in``).

    Raises:
        TypeError: a tensor argument of the wrong type or dtype. ValueError: shapes, ranges or ``group_size``.
    """

    KERNELS: ClassVar[tuple[str, ...]] = (REFERENCE, FLOAT, INT4)
    CACHED_KERNELS: ClassVar[tuple[str, ...]] = (FLOAT,)

    def __init__(
        self, codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None, group_size: int | None
    ) -> None:
        group_size = _check_codes_and_group(codes, group_size)
        _check_params(codes, scale, zero_point, bias, group_size)
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features)
        packed = pack_bits(codes.detach().to(torch.int16) - QMIN, BITS)
        self._init_buffers(packed, scale, zero_point, bias, group_size)

    def _init_buffers(
        self, packed: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None, group_size: int
    ) -> None:
        self.group_size = group_size
        self.register_buffer("packed", packed.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.detach().float().clone())
        zp = None if zero_point is None else zero_point.detach().float().clone()
        self.register_buffer("zero_point", zp)
        self.register_buffer("bias", float_bias(bias))

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, linear: nn.Linear, group_size: int | None = 128, symmetric: bool = True) -> Int4Linear:
        """Round-to-nearest int4 of a float ``nn.Linear`` with min-max scales (as the fake-quant layers compute).

        ``(S, Z) = compute_qparams(W, 4, symmetric, group_size=g)``, ``q = quantize(W, S, Z, 4)``.

        Args:
            linear: the layer to quantize, weight ``(out, in)`` with ``in`` even.
            group_size: inputs per scale (a divisor of ``in``), or None for one scale per output channel.
            symmetric: ``Z = 0`` (True) or min-max asymmetric with integer zero-points.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``. ValueError: ``group_size`` does not divide ``in``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls.from_quantized(round_to_nearest(linear.weight, BITS, symmetric, group_size), linear.bias)

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, bias: Tensor | None = None) -> Int4Linear:
        """The layer for integer codes of 4 bits or fewer (any group size, symmetric or not); weight-only.

        Raises:
            ValueError: codes of format ``"codebook"`` or wider than 4 bits.
        """
        if weight.format != "int" or weight.bits > BITS:
            raise ValueError(
                f"Int4Linear takes integer codes of at most {BITS} bits, got format={weight.format!r}, "
                f"bits={weight.bits}"
            )
        return cls(weight.codes, weight.scale, weight.zero_point, bias, weight.group_size)

    def spec(self) -> dict[str, Any]:
        """``{"in_features", "out_features", "group_size", "symmetric", "bias"}`` (what :meth:`from_spec` reads)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "symmetric": self.zero_point is None,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Int4Linear:
        """An empty layer (zero codes, unit scales) of :meth:`spec`'s shapes, ready for ``load_state_dict``.

        Raises:
            ValueError: a key of :data:`SPEC_KEYS` is missing, or the shapes are not a valid int4 layer.
        """
        missing = [key for key in SPEC_KEYS if key not in spec]
        if missing:
            raise ValueError(f"spec lacks {missing} for Int4Linear; required keys: {list(SPEC_KEYS)}")
        out_f, in_f, group = int(spec["out_features"]), int(spec["in_features"]), int(spec["group_size"])
        _check_codes_and_group(torch.empty(out_f, in_f, dtype=torch.int8, device="meta"), group)
        layer = cls.__new__(cls)
        ExportedLinear.__init__(layer, in_f, out_f)
        scale = torch.ones(out_f, in_f // group)
        zero_point = None if spec["symmetric"] else torch.zeros_like(scale)
        bias = torch.zeros(out_f) if spec["bias"] else None
        layer._init_buffers(torch.zeros(out_f, in_f // 2, dtype=torch.uint8), scale, zero_point, bias, group)
        return layer

    # ------------------------------------------------------------------------------ the weight and reference
    def codes(self) -> Tensor:
        """The signed codes ``q``, int8 ``(out, in)`` in ``[-8, 7]`` (unpacked from :attr:`packed`)."""
        return unpack_bits(self.packed, BITS).to(torch.int8) + QMIN

    def quantized(self) -> QuantizedLayer:
        """The stored weight as a :class:`QuantizedLayer` (4-bit codes, scales, zero-points; weight-only)."""
        group = None if self.group_size == self.in_features else self.group_size
        return QuantizedLayer(QuantizedWeight(self.codes(), self.scale, self.zero_point, BITS, group))

    def dequantized_weight(self) -> Tensor:
        """``W = S * (q - Z)``, float32 ``(out, in)``: ``functional.quant.dequantize`` of the stored codes."""
        zero_point = self.zero_point if self.zero_point is not None else torch.zeros((), device=self.scale.device)
        return dequantize(self.codes(), self.scale, zero_point)

    def reference(self, x: Tensor) -> Tensor:
        """``F.linear(x, W, b)`` in ``x``'s dtype, ``W`` from :meth:`dequantized_weight`."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    # ------------------------------------------------------------------------------ the int4 kernel
    def available_kernels(self) -> list[str]:
        """``reference`` and ``float`` everywhere, plus ``int4`` where torch's int4 matmul takes this layer."""
        kernels = super().available_kernels()
        return kernels + [INT4] if self._int4_unsupported_reason() is None else kernels

    def _int4_unsupported_reason(self) -> str | None:
        """Why torch's int4 matmul cannot run this layer on its device (None when it can)."""
        if kernel_group_size(self.group_size) is None:
            return f"group_size={self.group_size} is not a multiple of any of {list(KERNEL_GROUP_SIZES)}"
        device = self.packed.device
        if device.type == "cpu":
            if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
                return "this torch has no _weight_int4pack_mm_for_cpu"
            return None if self.out_features % 16 == 0 else f"out_features={self.out_features} is not a multiple of 16"
        if device.type == "cuda":
            return _cuda_unsupported_reason(device, self.in_features, self.out_features)
        return f"no int4 kernel on {device.type}"

    def _prepare(self, kernel: str) -> Any:
        if kernel != INT4:
            return super()._prepare(kernel)
        reason = self._int4_unsupported_reason()
        if reason is not None:
            raise ValueError(f"kernel='int4' is not available for {self.extra_repr()}: {reason}")
        group = kernel_group_size(self.group_size)
        unsigned = unpack_bits(self.packed, BITS)  # u = q + 8, (out, in) uint8
        if self.packed.device.type == "cuda":
            high_first = (unsigned[:, ::2] << 4) | unsigned[:, 1::2]  # tinygemm: even inputs in the high nibble
            weight = torch._convert_weight_to_int4pack(high_first.contiguous(), cuda_inner_k_tiles(self.in_features))
        else:
            weight = torch._convert_weight_to_int4pack_for_cpu(unsigned.to(torch.int32), 1)
        return Int4KernelCache(weight, group, self._scales_and_zeros(group))

    def _scales_and_zeros(self, group: int) -> Tensor:
        """float32 ``(in / group, out, 2)``: ``S`` and ``-Z * S`` per kernel group (``w = (u - 8) * S - Z * S``)."""
        repeat = self.group_size // group
        scale = self.scale.repeat_interleave(repeat, dim=1)
        zero = torch.zeros_like(scale) if self.zero_point is None else -self.zero_point.repeat_interleave(repeat, 1)
        return torch.stack([scale, zero * scale], dim=-1).transpose(0, 1).contiguous()

    def _kernel_forward(self, x: Tensor, kernel: str) -> Tensor:
        """The ``int4`` kernel on ``x (tokens, in)``: input cast to the kernel's dtype (bf16 on CUDA; fp32, bf16 or
        fp16 as given on CPU), output cast back to ``x``'s dtype, bias added."""
        cache: Int4KernelCache = self._caches[INT4]
        if x.device.type == "cuda":
            compute, matmul = torch.bfloat16, torch._weight_int4pack_mm
        else:
            compute = x.dtype if x.dtype in CPU_KERNEL_DTYPES else torch.float32
            matmul = torch._weight_int4pack_mm_for_cpu
        if x.shape[0] == 0:
            y = x.new_zeros(0, self.out_features)
        else:
            xk = x.to(compute).contiguous()
            y = matmul(xk, cache.weight, cache.group_size, cache.scales_and_zeros_as(compute)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @property
    def weight_bits(self) -> int:
        """4: packed int4 codes."""
        return BITS

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"symmetric={self.zero_point is None}, bias={self.bias is not None}, kernel={self.kernel!r}"
        )


def _cuda_unsupported_reason(device: torch.device, in_features: int, out_features: int) -> str | None:
    """Why tinygemm (``_weight_int4pack_mm``) cannot run an ``(out, in)`` layer on ``device`` (None if it can).

    It needs CUDA (not ROCm) compute capability 8.0+, ``out % 8 == 0`` (n-tiles of 8) and ``in % 32 == 0``
    (k-tiles of 16, at least two packed per int32); the group-size rule is checked by the caller.
    """
    if torch.version.hip is not None or not hasattr(torch, "_weight_int4pack_mm"):
        return "tinygemm int4 matmul needs a CUDA (not ROCm) build of torch"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"tinygemm needs compute capability 8.0+, got {torch.cuda.get_device_capability(device)}"
    if out_features % 8:
        return f"out_features={out_features} is not a multiple of 8"
    if cuda_inner_k_tiles(in_features) is None:
        return f"in_features={in_features} is not a multiple of 32"
    return None


def _check_codes_and_group(codes: Tensor, group_size: int | None) -> int:
    """Validate the codes' type and shape and the group size; returns the group size (``in`` for None)."""
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8 (signed 4-bit codes in [{QMIN}, {QMAX}]), got dtype {codes.dtype}")
    if codes.dim() != 2 or codes.numel() == 0:
        raise ValueError(f"codes must be a non-empty 2-D (out_features, in_features) tensor, got {tuple(codes.shape)}")
    in_features = codes.shape[1]
    if in_features % 2:
        raise ValueError(f"in_features={in_features} is odd; allowed: an even number (two codes pack into a byte)")
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {group_size!r}")
    if group_size < 1 or in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}; allowed: a divisor")
    return group_size


def _check_params(
    codes: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None, group_size: int
) -> None:
    """Validate code range, and the shapes, dtypes and values of scale, zero-point and bias."""
    lo, hi = int(codes.min()), int(codes.max())
    if lo < QMIN or hi > QMAX:
        raise ValueError(f"codes must lie in [{QMIN}, {QMAX}] (signed 4-bit), got values in [{lo}, {hi}]")
    out_features, in_features = codes.shape
    groups = (out_features, in_features // group_size)
    _check_float_tensor("scale", scale, groups)
    if not bool((scale > 0).all()) or not bool(scale.isfinite().all()):
        raise ValueError("scale must be positive and finite everywhere")
    if zero_point is not None:
        if not isinstance(zero_point, Tensor) or zero_point.dtype == torch.bool or zero_point.is_complex():
            raise TypeError(f"zero_point must be a real Tensor or None, got {type(zero_point).__name__}")
        if tuple(zero_point.shape) != groups:
            raise ValueError(f"zero_point has shape {tuple(zero_point.shape)}; allowed: scale's shape {groups}")
        z = zero_point.double()
        if not bool((z.isfinite() & (z == z.round())).all()):
            raise ValueError("zero_point must hold finite integers (as compute_qparams produces)")
    if bias is not None:
        _check_float_tensor("bias", bias, (out_features,))


def _check_float_tensor(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    """TypeError unless ``t`` is a floating-point Tensor; ValueError unless its shape is ``shape``."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point Tensor, got {kind}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; allowed: {shape}")
