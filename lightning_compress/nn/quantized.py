"""The typed hand-off of quantization: what an algorithm leaves and what the exporters and file writers read.

Every algorithm that puts weights on a grid (QAT, GPTQ, SmoothQuant, and the ones to come) describes each layer as a
:class:`QuantizedLayer`: its :class:`QuantizedWeight` (integer codes with their scales and zero-points, or k-means
codebook indices) and, when the layer also quantizes what it reads, its :class:`QuantizedInput`. The fields are
checked once, when the value is made, so whatever consumes it (``export_for_inference``, a file writer) can trust
shapes, dtypes and ranges. Formulas (Jacob et al. 2018; Han et al. 2016 for the codebook):

- ``"int"``: ``w = (codes - zero_point) · scale`` with ``codes`` in ``[-2^(bits-1), 2^(bits-1) - 1]``;
- ``"codebook"``: ``w = codebook[codes] · mask`` (pruned weights stay exactly zero);
- ``"fp8"``: ``w = codes · scale`` with ``codes`` ``torch.float8_e4m3fn`` values (Micikevicius et al. 2022), 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lightning_compress.functional.quant import (
    check_bits,
    check_method,
    compute_qparams,
    dequantize,
    expand_params,
    quant_range,
    quantize,
)

FORMATS = ("int", "codebook", "fp8")


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight on a quantization grid.

    Attributes:
        codes: the weight's shape ``(out, in, ...)``; int8 signed codes (``"int"``), int64 codebook indices, or
            ``torch.float8_e4m3fn`` values (``"fp8"``).
        scale: ``"int"`` and ``"fp8"``: float, block-shaped: ``(out, 1)`` per output channel, ``(out, in / group_size)``
            per group, ``(out, in)`` one per column (GPTQ's act-order groups), ``()`` per tensor.
        zero_point: integer-valued float of ``scale``'s shape, or None for symmetric codes (zero-point 0).
        bits: code width, 2..8 (``"codebook"``: ``log2`` of the codebook size).
        group_size: inputs per scale along each row, or None (per channel / per tensor).
        format: ``"int"``, ``"codebook"`` or ``"fp8"`` (``bits=8``, no zero-point).
        codebook: ``"codebook"`` only: the ``2^bits`` shared values.
        mask: bool of the weight's shape, False where the weight is pruned to zero; None when nothing is.

    Raises:
        ValueError / TypeError: fields that do not describe one weight (named).
    """

    codes: Tensor
    scale: Tensor | None
    zero_point: Tensor | None
    bits: int
    group_size: int | None = None
    format: str = "int"
    codebook: Tensor | None = None
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not supported; allowed: {list(FORMATS)}")
        if self.mask is not None and (self.mask.dtype != torch.bool or self.mask.shape != self.codes.shape):
            raise ValueError(f"mask must be bool of the codes' shape {tuple(self.codes.shape)}")
        if self.format == "codebook":
            self._check_codebook()
        else:
            self._check_int()

    def _check_int(self) -> None:
        want = torch.float8_e4m3fn if self.format == "fp8" else torch.int8
        if self.codes.dtype != want:
            name = str(want).removeprefix("torch.")
            raise TypeError(f"codes of format {self.format!r} must be {name}, got {self.codes.dtype}")
        if self.scale is None or not self.scale.is_floating_point():
            raise TypeError(f"format {self.format!r} needs a float scale")
        expand_params(self.scale, self.codes.shape)  # raises when the scale does not tile the weight
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError(f"zero_point {tuple(self.zero_point.shape)} must match scale {tuple(self.scale.shape)}")
        if self.codebook is not None:
            raise ValueError("codebook is for format 'codebook' only")
        if self.format == "fp8":
            if self.bits != 8 or self.zero_point is not None:
                raise ValueError(f"format 'fp8' has bits=8 and no zero_point, got bits={self.bits}")
            return
        qmin, qmax = quant_range(self.bits)
        if self.codes.numel() and not qmin <= int(self.codes.min()) <= int(self.codes.max()) <= qmax:
            raise ValueError(f"codes lie outside [{qmin}, {qmax}], the range of {self.bits}-bit codes")

    def _check_codebook(self) -> None:
        if self.codebook is None or self.codebook.shape != (2**self.bits,):
            raise ValueError(f"format 'codebook' needs a codebook of {2**self.bits} values")
        if self.codes.dtype != torch.int64:
            raise TypeError(f"codebook indices must be int64, got {self.codes.dtype}")
        if self.scale is not None or self.zero_point is not None:
            raise ValueError("format 'codebook' takes no scale or zero_point")

    @property
    def symmetric(self) -> bool:
        """Whether the codes are symmetric (zero-point 0)."""
        return self.zero_point is None

    def dequantize(self) -> Tensor:
        """The float weight the codes stand for, float32 of ``codes``' shape (the formulas in the module docstring)."""
        if self.format == "codebook":
            w = self.codebook.float()[self.codes]
        else:
            zero = torch.zeros((), device=self.codes.device) if self.zero_point is None else self.zero_point
            w = dequantize(self.codes, self.scale.float(), zero.float())
        return w if self.mask is None else w * self.mask


@dataclass(frozen=True)
class QuantizedInput:
    """How a layer quantizes its input ``x (..., in)``: ``q = clamp(round((x / smooth) / scale + zero_point))``.

    Attributes:
        bits: code width, 2..8.
        scale: static 0-dim scale, or None for dynamic symmetric scales per token (``max|x_t| / qmax``).
        zero_point: static 0-dim zero-point (asymmetric, with a static scale), or None.
        smooth: ``(in,)`` SmoothQuant divisor applied first, or None.
        method: ``"linear"`` (integer codes) or ``"fp8"`` (E4M3 codes, ``scale = max|x| / 448``; 8 bits, symmetric).
    """

    bits: int
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    smooth: Tensor | None = None
    method: str = "linear"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_method(self.method, self.bits, self.zero_point is None)
        if self.scale is not None and (self.scale.dim() != 0 or not bool(self.scale > 0)):
            raise ValueError(f"scale must be a positive 0-dim tensor or None (dynamic), got {self.scale!r}")
        if self.zero_point is not None and (self.scale is None or self.zero_point.dim() != 0):
            raise ValueError("zero_point needs a static scale and must be 0-dim")
        if self.smooth is not None and self.smooth.dim() != 1:
            raise ValueError(f"smooth must be 1-D (in,), got shape {tuple(self.smooth.shape)}")

    @property
    def dynamic(self) -> bool:
        """Whether the scale is computed per token at run time."""
        return self.scale is None


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer as an algorithm left it: its weight on a grid and, if it quantizes its input, how."""

    weight: QuantizedWeight
    input: QuantizedInput | None = None

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor field as ``{"weight.codes": ..., "weight.scale": ..., "input.scale": ...}`` (None fields
        left out; CPU copies), e.g. for a safetensors file."""
        out = {}
        for part in ("weight", "input"):
            value = getattr(self, part)
            for f in fields(value) if value is not None else ():
                t = getattr(value, f.name)
                if isinstance(t, Tensor):
                    out[f"{part}.{f.name}"] = t.detach().cpu().clone()
        return out


def round_to_nearest(
    weight: Tensor, bits: int, symmetric: bool = True, group_size: int | None = None, method: str = "linear"
) -> QuantizedWeight:
    """Round-to-nearest min-max quantization of a float weight ``(out, in, ...)``: per output channel, or per group of
    ``group_size`` inputs (``compute_qparams`` then ``quantize``); ``method="fp8"`` onto the E4M3 grid (``bits=8``,
    symmetric), format ``"fp8"``."""
    w = weight.detach().float()
    axis = 0 if group_size is None else None
    scale, zero_point = compute_qparams(w, bits, symmetric, axis=axis, group_size=group_size, method=method)
    codes = quantize(w, scale, zero_point, bits, method)
    fmt = "fp8" if method == "fp8" else "int"
    return QuantizedWeight(codes, scale, None if symmetric else zero_point, bits, group_size, fmt)
