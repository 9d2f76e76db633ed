"""The compression summary: per layer parameters, sparsity, bits and bytes, and the total ratio against FP32.

Sparsity is counted from the weights themselves (the truth, whatever produced it). A module that stores its
weight in a compressed format tells how through a ``weight_format`` attribute (a
:class:`~lightning_compress.functional.size.TensorFormat`); otherwise the weight's dtype sets the bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_compress.functional.size import TensorFormat, ratio, tensor_bits


@dataclass(frozen=True)
class LayerRow:
    """One parameter-owning module of the summary."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    bits: int
    fp32_bytes: float
    bytes: float

    @property
    def sparsity(self) -> float:
        """Fraction of exactly-zero weights."""
        return 1.0 - self.nonzero / self.params if self.params else 0.0


@dataclass(frozen=True)
class CompressionSummary:
    """Per-layer rows plus totals over every parameter of the model."""

    rows: list[LayerRow] = field(default_factory=list)

    @property
    def params(self) -> int:
        """Total parameter count."""
        return sum(r.params for r in self.rows)

    @property
    def fp32_bytes(self) -> float:
        """Bytes of the whole model stored densely in FP32."""
        return sum(r.fp32_bytes for r in self.rows)

    @property
    def bytes(self) -> float:
        """Bytes of the whole model in its current formats, metadata included."""
        return sum(r.bytes for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Fraction of exactly-zero parameters over the whole model."""
        return 1.0 - sum(r.nonzero for r in self.rows) / self.params if self.params else 0.0

    @property
    def ratio(self) -> float:
        """Compression ratio against FP32."""
        return ratio(self.fp32_bytes, self.bytes)

    def to_markdown(self) -> str:
        """The summary as a markdown table with a totals line."""
        lines = [
            "| layer | type | shape | params | sparsity | bits | bytes | vs FP32 |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            shape = "×".join(map(str, r.shape))
            lines.append(
                f"| {r.name} | {r.kind} | {shape} | {r.params:,} | {r.sparsity:.1%} | {r.bits} | "
                f"{r.bytes:,.0f} | {ratio(r.fp32_bytes, r.bytes):.2f}× |"
            )
        lines.append(
            f"| **total** | | | {self.params:,} | {self.sparsity:.1%} | | {self.bytes:,.0f} | **{self.ratio:.2f}×** |"
        )
        return "\n".join(lines)


def _format_of(module: nn.Module, param: torch.Tensor) -> TensorFormat:
    declared = getattr(module, "weight_format", None)
    return declared if isinstance(declared, TensorFormat) else TensorFormat(bits=param.element_size() * 8)


def _param_bits(module: nn.Module, name: str, param: torch.Tensor) -> tuple[int, int]:
    """``(nonzero, bits)`` of one parameter: a weight in its (possibly sparse / quantized) format, anything
    else (biases, norms) dense at its dtype, zeros included."""
    if name != "weight":
        return param.numel(), param.numel() * param.element_size() * 8
    nnz = int(torch.count_nonzero(param.detach()))
    return nnz, tensor_bits(param.numel(), nnz, _format_of(module, param))


def compression_summary(model: nn.Module) -> CompressionSummary:
    """Summarize every module that owns parameters: one row per module, weights and biases together.

    Sparsity counts the exact zeros of each ``weight``; other parameters (biases, norms) count as dense.

    Args:
        model: any ``nn.Module``.

    Returns:
        A :class:`CompressionSummary` whose totals cover every parameter of ``model``.
    """
    rows = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        counts = [_param_bits(module, pname, p) for pname, p in own]
        weight = getattr(module, "weight", None)
        first = weight if isinstance(weight, torch.Tensor) else own[0][1]
        rows.append(
            LayerRow(
                name=name or "(root)",
                kind=type(module).__name__,
                shape=tuple(first.shape),
                params=sum(p.numel() for _, p in own),
                nonzero=sum(nnz for nnz, _ in counts),
                bits=_format_of(module, first).bits,
                fp32_bytes=sum(p.numel() for _, p in own) * 4.0,
                bytes=sum(bits for _, bits in counts) / 8,
            )
        )
    return CompressionSummary(rows)
