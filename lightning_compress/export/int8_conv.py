"""Int8Conv2d: a W8A8 2-D convolution, int8 per-output-channel weights and static int8 activations, over oneDNN.

The weight is ``W = S_w ⊙ q_w`` (symmetric codes, one scale per output channel); the input is quantized with the
static scale and zero-point its observer calibrated (QAT's ``ActQuantizer``, or a static
``SymmetricActQuantizer``): ``q_x = clamp(round(x / S_x + Z_x), qmin, qmax)``. Then
``y = conv(q_x - Z_x, q_w) S_x S_w + b`` with int32 accumulation: oneDNN's quantized convolution
(:mod:`~lightning_compress.export.onednn`) on x86 CPUs. Zero padding is the real value 0 (the zero-point in codes),
as in the fake-quant conv, which :meth:`Int8Conv2d.reference` equals exactly.

Kernels: ``"reference"`` (fake-quantize the input, dequantize the weight, ``F.conv2d``), ``"float"`` (a cached
dequantized weight; the input still fake-quantized, since the model was trained or calibrated with that clipping),
``"onednn"`` (CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.export.int8_linear import ActQuantMixin, channel_scale, check_int_channel_codes, run_compiled
from lightning_compress.export.layer import FLOAT, REFERENCE, ExportedLayer, float_bias
from lightning_compress.export.onednn import (
    ONEDNN,
    OUTPUT_DTYPES,
    U8_SHIFT,
    prepack_conv,
    qconv2d,
    quantize_static_u8,
)
from lightning_compress.functional.quant import dequantize, quant_range
from lightning_compress.nn.quantized import QuantizedInput, QuantizedLayer, QuantizedWeight

GEOMETRY_KEYS = ("kernel_size", "stride", "padding", "dilation", "groups")
# Positions per timing input when no example input is given: rows = batch x 16 x 16.
DEFAULT_SIDE = 16


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """``{kernel_size, stride, padding, dilation, groups}`` of ``conv`` with integer padding; ValueError for what
    the int8 convolution does not take (a padding mode other than zeros, ``padding="same"`` with stride > 1)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r}; allowed: 'zeros'")
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        if any(s != 1 for s in conv.stride) or any(
            d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        ):
            raise ValueError("padding='same' needs stride 1 and symmetric padding; allowed: integer padding")
        padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    return {
        "kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(padding),
        "dilation": list(conv.dilation), "groups": conv.groups,
    }  # fmt: skip


@dataclass
class OnednnConvCache:
    """The ``"onednn"`` kernel's state: prepacked codes (for this input quantization), float32 scales and bias."""

    packed: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    x_scale: float
    x_zero_point: float


class Int8Conv2d(ActQuantMixin, ExportedLayer):
    """W8A8 ``nn.Conv2d``: ``(N, in, H, W) -> (N, out, H', W')``, int8 weight codes, static input quantization.

    Args:
        codes: int8 ``(out, in / groups, kh, kw)`` symmetric weight codes.
        weight_scale: ``out`` per-channel scales (any shape with ``out`` elements).
        bias: ``(out,)`` or None.
        geometry: :func:`conv_geometry` of the float conv (kernel size, stride, integer padding, dilation, groups).
        act_bits: input code width (2-8).
        act_scale: static per-tensor input scale (required: per-token scales have no meaning for a conv).
        act_zero_point: static zero-point (asymmetric inputs), or None.

    Raises:
        TypeError / ValueError: codes, scales, geometry or activation arguments that do not fit.
    """

    KERNELS: ClassVar[tuple[str, ...]] = (REFERENCE, FLOAT, ONEDNN)
    # oneDNN's prepacked weight is the int8 codes reordered (as for Int8Linear), not a dense float copy
    CACHED_KERNELS: ClassVar[tuple[str, ...]] = (FLOAT,)

    def __init__(
        self,
        codes: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        geometry: dict[str, Any],
        act_bits: int = 8,
        act_scale: Tensor | None = None,
        act_zero_point: Tensor | None = None,
    ) -> None:
        if not isinstance(codes, Tensor) or codes.dtype != torch.int8 or codes.dim() != 4:
            got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
            raise TypeError(f"codes must be a 4-D int8 tensor (out, in / groups, kh, kw), got {got}")
        missing = [k for k in GEOMETRY_KEYS if k not in geometry]
        if missing:
            raise ValueError(f"geometry lacks {missing}; required keys: {list(GEOMETRY_KEYS)}")
        out_channels, per_group, kh, kw = codes.shape
        groups = int(geometry["groups"])
        if list(geometry["kernel_size"]) != [kh, kw] or out_channels % groups:
            raise ValueError(f"geometry {geometry} does not fit codes of shape {tuple(codes.shape)}")
        if act_scale is None:
            raise ValueError("act_scale is None; allowed: a static input scale (Int8Conv2d has no dynamic inputs)")
        scale = channel_scale(weight_scale, out_channels)
        if bias is not None and bias.shape != (out_channels,):
            raise ValueError(f"bias must be ({out_channels},), got {tuple(bias.shape)}")
        super().__init__(per_group * groups, out_channels)
        self.geometry = {k: geometry[k] if k == "groups" else [int(v) for v in geometry[k]] for k in GEOMETRY_KEYS}
        self.geometry["groups"] = groups
        self.register_buffer("codes", codes.detach().contiguous().clone())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", float_bias(bias))
        check_static_conv_input(act_bits, act_zero_point)
        self._register_act(act_bits, act_scale, act_zero_point, None, self.in_features)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, conv: nn.Conv2d, input: QuantizedInput | None) -> Int8Conv2d:
        """The layer for a conv's symmetric per-channel codes and its static input quantization.

        Raises:
            ValueError: grouped or asymmetric codes, dynamic or missing input quantization, an unsupported padding.
        """
        check_int_channel_codes(weight)
        if input is None or input.dynamic or input.smooth is not None:
            raise ValueError(
                "Int8Conv2d needs a static input scale (an observer's range); got "
                f"{'no input quantization' if input is None else 'dynamic or smoothed input quantization'}"
            )
        args = cls.act_arguments(input)
        del args["smooth"]
        return cls(weight.codes, weight.scale, conv.bias, conv_geometry(conv), **args)

    def spec(self) -> dict[str, Any]:
        shape = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}
        return {**shape, **self.geometry, **self.act_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Int8Conv2d:
        kh, kw = spec["kernel_size"]
        codes = torch.zeros(spec["out_features"], spec["in_features"] // spec["groups"], kh, kw, dtype=torch.int8)
        bias = torch.zeros(spec["out_features"]) if spec["bias"] else None
        act = cls.act_placeholders(spec)
        del act["smooth"]
        return cls(codes, torch.ones(spec["out_features"]), bias, {k: spec[k] for k in GEOMETRY_KEYS}, **act)

    def fits(self, module: nn.Module) -> bool:
        """``module`` is a Conv2d with this layer's channels and geometry."""
        if not isinstance(module, nn.Conv2d):
            return False
        try:
            geometry = conv_geometry(module)
        except ValueError:
            return False
        return (module.in_channels, module.out_channels) == (self.in_features, self.out_features) and all(
            geometry[k] == self.geometry[k] for k in GEOMETRY_KEYS
        )

    # ------------------------------------------------------------------------------ the weight and reference
    def quantized(self) -> QuantizedLayer:
        """The stored codes and input quantization as a :class:`QuantizedLayer`."""
        scale = self.weight_scale.reshape(-1, 1, 1, 1)
        return QuantizedLayer(QuantizedWeight(self.codes, scale, None, 8), self.quantized_input())

    def dequantized_weight(self) -> Tensor:
        """``S_w ⊙ q_w``, float32 ``(out, in / groups, kh, kw)``."""
        return dequantize(self.codes, self.weight_scale.reshape(-1, 1, 1, 1), torch.zeros((), device=self.codes.device))

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        g = self.geometry
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, g["stride"], g["padding"], g["dilation"], g["groups"])

    def reference(self, x: Tensor) -> Tensor:
        """``F.conv2d(fake-quantized x, S_w ⊙ q_w, b)`` in ``x``'s dtype: what the fake-quant conv computes."""
        return self._conv(self.fake_quantized_input(x), self.dequantized_weight().to(x.dtype))

    def random_input(self, rows: int, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
        """Standard normal input of ``shape`` (an example input's), else ``rows`` positions as ``(rows / 256,
        in, 16, 16)``."""
        if shape is None:
            shape = (max(1, rows // DEFAULT_SIDE**2), self.in_features, DEFAULT_SIDE, DEFAULT_SIDE)
        return torch.randn(shape, device=self.codes.device, dtype=dtype)

    # ------------------------------------------------------------------------------ kernels
    def available_kernels(self) -> list[str]:
        kernels = super().available_kernels()
        return kernels + [ONEDNN] if self.onednn_available(self.codes.device) else kernels

    def _prepare(self, kernel: str) -> Any:
        if kernel == FLOAT:
            return self.dequantized_weight().contiguous(memory_format=torch.channels_last)
        if kernel != ONEDNN:
            return super()._prepare(kernel)
        g, s = self.geometry, float(self.act_scale)
        z = 0.0 if self.act_zero_point is None else float(self.act_zero_point)
        packed = prepack_conv(
            self.codes, self.weight_scale, s, int(z) + U8_SHIFT, g["stride"], g["padding"], g["dilation"], g["groups"]
        )
        return OnednnConvCache(packed, self.weight_scale.contiguous(), self.bias, s, z)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == REFERENCE:
            return self.reference(x)
        if self.kernel == FLOAT:  # channels-last, oneDNN's fast layout for float convs on CPU
            x = self.float_input(x).contiguous(memory_format=torch.channels_last)
            return self._conv(x, self.float_weight(x.dtype))
        cache: OnednnConvCache = self._caches[ONEDNN]
        out = x.dtype if x.dtype in OUTPUT_DTYPES else torch.float32
        u = run_compiled(quantize_static_u8, x, self.act_bits, cache.x_scale, cache.x_zero_point, None)
        u = u.contiguous(memory_format=torch.channels_last)
        bias = None if cache.bias is None else cache.bias.to(out)
        g = self.geometry
        y = qconv2d(
            u, cache.x_scale, int(cache.x_zero_point) + U8_SHIFT, cache.packed, cache.weight_scale, bias,
            g["stride"], g["padding"], g["dilation"], g["groups"], out,
        )  # fmt: skip
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"in={self.in_features}, out={self.out_features}, kernel_size={tuple(g['kernel_size'])}, "
            f"stride={tuple(g['stride'])}, padding={tuple(g['padding'])}, groups={g['groups']}, kernel={self.kernel!r}"
        )


def check_static_conv_input(bits: int, zero_point: Tensor | None) -> None:
    """ValueError unless the static zero-point lies in the signed ``bits``-bit range (so ``Z + 128`` is a uint8)."""
    qmin, qmax = quant_range(bits)
    if zero_point is not None and not qmin <= float(zero_point) <= qmax:
        raise ValueError(f"act_zero_point={float(zero_point)} lies outside [{qmin}, {qmax}]")
