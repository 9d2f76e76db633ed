"""The compression summary: per layer parameters, sparsity, bits and bytes, and the total ratio against FP32.

Sparsity is counted from the weights themselves (the truth, whatever produced it). A module that stores its
weight in a compressed format tells how through a ``weight_format`` attribute (a
:class:`~lightning_compress.functional.size.TensorFormat`); otherwise the weight's dtype sets the bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lightning_compress.export.layer import ExportedLayer
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.functional.kmeans import deep_compression_bits
from lightning_compress.functional.masks import sparsity_pattern
from lightning_compress.functional.size import TensorFormat, index_bits, ratio, tensor_bits


@dataclass(frozen=True)
class LayerRow:
    """One parameter-owning module of the summary."""

    name: str
    kind: str
    shape: tuple[int, ...]
    pattern: str
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
            "| layer | type | shape | params | sparsity | pattern | bits | bytes | vs FP32 |",
            "|---|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in self.rows:
            shape = "×".join(map(str, r.shape))
            lines.append(
                f"| {r.name} | {r.kind} | {shape} | {r.params:,} | {r.sparsity:.1%} | {r.pattern} | {r.bits} | "
                f"{r.bytes:,.0f} | {ratio(r.fp32_bytes, r.bytes):.2f}× |"
            )
        lines.append(
            f"| **total** | | | {self.params:,} | {self.sparsity:.1%} | | | {self.bytes:,.0f} | **{self.ratio:.2f}×** |"
        )
        return "\n".join(lines)


def weight_format(module: nn.Module, weight: torch.Tensor, pattern: str, sparse: bool = True) -> TensorFormat:
    """How ``weight`` is stored: the module's declared ``weight_format``, else dense at the dtype's bits; with
    ``sparse``, an N:M or row pattern seen in its zeros (``pattern``, from :func:`sparsity_pattern`) is stored as
    such (what an export would make of it); without, the zeros are stored densely (as they are on disk)."""
    declared = getattr(module, "weight_format", None)
    fmt = declared if isinstance(declared, TensorFormat) else TensorFormat(bits=weight.element_size() * 8)
    if not sparse:
        return fmt
    if fmt.nm is None and fmt.rows is None and pattern == "2:4":
        return replace(fmt, nm=(2, 4))
    if fmt.nm is None and fmt.rows is None and pattern == "rows":
        return replace(fmt, rows=weight.shape[0])
    return fmt


def pruned_zeros(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Bool of ``weight``'s shape: its zeros that are pruned weights. A quantized layer's weights that merely round
    to code 0 are not (its quantizer's ``pruned`` mask, recorded before rounding, tells them apart)."""
    zeros = weight.detach() == 0
    pruned = getattr(getattr(module, "weight_quantizer", None), "pruned", None)
    return zeros if pruned is None else zeros & pruned.to(zeros.device)


def _layer_row(name: str, module: nn.Module, own: list[tuple[str, torch.Tensor]], sparse: bool = True) -> LayerRow:
    """One row: the ``weight`` in its (possibly sparse / quantized) format, other parameters (biases, norms) dense
    at their dtype, zeros included."""
    params = sum(p.numel() for _, p in own)
    other = [p for n, p in own if n != "weight"]
    nonzero = sum(p.numel() for p in other)
    bits = sum(p.numel() * p.element_size() * 8 for p in other)
    weight = dict(own).get("weight")
    pattern, wbits, shape = "dense", other[0].element_size() * 8 if other else 32, tuple(own[0][1].shape)
    if weight is not None:
        pattern, shape = sparsity_pattern(~pruned_zeros(module, weight)), tuple(weight.shape)
        fmt = weight_format(module, weight, pattern, sparse)
        nnz = weight.numel() - int(pruned_zeros(module, weight).sum())
        wbits = index_bits(fmt.codebook_size) if fmt.codebook_size else fmt.bits
        stored = nnz if sparse else weight.numel()  # stored densely: the zeros take their place too
        nonzero, bits = nonzero + nnz, bits + tensor_bits(weight.numel(), stored, fmt)
    return LayerRow(
        name or "(root)", type(module).__name__, shape, pattern, params, nonzero, wbits, params * 4.0, bits / 8
    )


def _exported_row(name: str, module: ExportedLayer) -> LayerRow:
    """One row for an exported inference layer: its bytes are the persistent buffers (codes, positions, scales,
    bias) exactly as ``save_exported`` writes them; sparsity and pattern from its dequantized weight."""
    weight = module.dequantized_weight()
    pattern = "2:4" if isinstance(module, SemiStructuredSparseLinear) else sparsity_pattern(weight)
    bias = 0 if getattr(module, "bias", None) is None else module.bias.numel()
    params = weight.numel() + bias
    nonzero = int(torch.count_nonzero(weight)) + bias
    return LayerRow(name, type(module).__name__, tuple(weight.shape), pattern, params, nonzero,
                    module.weight_bits, params * 4.0, float(module.storage_bytes()))  # fmt: skip


def compression_summary(model: nn.Module) -> CompressionSummary:
    """Summarize every module that owns parameters: one row per module, weights and biases together.

    Sparsity counts the exact zeros of each ``weight``; other parameters (biases, norms) count as dense. Exported
    inference layers (``export_for_inference``) count their stored buffers, and once a model holds any, its other
    layers count as they are stored beside them: dense, whatever pattern their zeros form. Only
    parameters in the model's ``state_dict`` count: a quantizer's working state (learned scales, codebooks) is
    part of its layer's declared ``weight_format``.

    Args:
        model: any ``nn.Module``.

    Returns:
        A :class:`CompressionSummary` whose totals cover every parameter of ``model``.
    """
    exported = [(n, m) for n, m in model.named_modules() if isinstance(m, ExportedLayer)]
    rows = [_layer_row(name, module, own, not exported) for name, module, own in _stored_parameters(model)]
    rows += [_exported_row(n, m) for n, m in exported]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return CompressionSummary(sorted(rows, key=lambda r: order.get(r.name if r.name != "(root)" else "", 0)))


def _stored_parameters(model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, torch.Tensor]]]]:
    """``(module name, module, its own parameters)`` for every module whose parameters are in the state_dict."""
    stored = {id(v) for v in model.state_dict(keep_vars=True).values()}
    found = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in stored]
        if own:
            found.append((name, module, own))
    return found


# Relative-index widths of Deep Compression's sparse format (Han et al. 2016): 8 bits for conv, 5 for fc layers.
CONV_INDEX_BITS, FC_INDEX_BITS = 8, 5
STAGES = ("dense", "pruned", "kmeans", "huffman")


def stage_sizes(model: nn.Module) -> dict[str, float]:
    """Bytes of the whole model after each Deep Compression stage (Han et al. 2016), every parameter counted.

    Each Linear / Conv weight is stored as in the paper: ``dense`` FP32; ``pruned``: non-zeros with relative
    indices (8 bits for conv, 5 for fc; filler entries for longer gaps); ``kmeans``: values as indices into the
    layer's codebook (its declared ``weight_format.codebook_size``; layers without one keep FP32 values);
    ``huffman``: both index streams Huffman-coded (code tables excluded, as the paper). Other parameters
    (biases, norms) count as FP32 in every stage.

    Returns:
        ``{stage: bytes}`` for ``dense``, ``pruned``, ``kmeans``, ``huffman``.
    """
    totals = dict.fromkeys(STAGES, 0.0)
    for _, module, own in _stored_parameters(model):
        for name, param in own:
            weight = name == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
            if not weight:
                for stage in STAGES:
                    totals[stage] += param.numel() * 4
                continue
            fmt = getattr(module, "weight_format", None)
            k = getattr(fmt, "codebook_size", None)
            index_bits = FC_INDEX_BITS if isinstance(module, nn.Linear) else CONV_INDEX_BITS
            bits = deep_compression_bits(param.detach(), k=k, index_bits=index_bits)
            bits.setdefault("kmeans", bits["pruned"])
            for stage in STAGES:
                totals[stage] += bits[stage] / 8
    return totals


def stage_markdown(sizes: dict[str, float]) -> str:
    """The stage sizes as a markdown table with the ratio to dense FP32."""
    lines = ["| stage | bytes | vs FP32 |", "|---|---:|---:|"]
    labels = {"dense": "dense FP32", "pruned": "pruned (+ relative indices)", "kmeans": "+ k-means weight sharing"}
    for stage, size in sizes.items():
        lines.append(f"| {labels.get(stage, '+ Huffman coding')} | {size:,.0f} | {ratio(sizes['dense'], size):.2f}× |")
    return "\n".join(lines)
