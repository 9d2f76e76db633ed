"""Size accounting: real bytes of the default model's weights under each storage format, metadata included.

Each format is applied for real (masks from ``functional.masks``, quantization parameters from
``functional.quant``) and counted by ``compression_summary``; the LLM rows are the closed-form sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks import Table
from lightning_compress.examples.models import SmallCNN
from lightning_compress.functional.masks import magnitude_mask, nm_mask
from lightning_compress.functional.quant import compute_qparams
from lightning_compress.functional.size import TensorFormat, model_bytes
from lightning_compress.nn.select import select_layers
from lightning_compress.summary import compression_summary


def _formatted(mask_fn, fmt_fn) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    for layer in select_layers(model).values():
        with torch.no_grad():
            if mask_fn is not None:
                layer.weight.mul_(mask_fn(layer.weight))
        if fmt_fn is not None:
            layer.weight_format = fmt_fn(layer.weight)
    return model


def _int(bits: int, group_size: int | None = None):
    def fmt(w: torch.Tensor) -> TensorFormat:
        gs = group_size if group_size and (w[0].numel() % group_size == 0) else None
        scales = compute_qparams(w, bits, axis=None if gs else 0, group_size=gs).scale.numel()
        return TensorFormat(bits=bits, n_scales=scales)

    return fmt


def _with_nm(fmt_fn):
    def fmt(w: torch.Tensor) -> TensorFormat:
        base = fmt_fn(w) if fmt_fn else TensorFormat()
        nm = (2, 4) if w.shape[1] % 4 == 0 else None
        return TensorFormat(bits=base.bits, n_scales=base.n_scales, nm=nm)

    return fmt


def _nm_where_possible(w: torch.Tensor) -> torch.Tensor:
    return nm_mask(w) if w.shape[1] % 4 == 0 else torch.ones_like(w, dtype=torch.bool)


def run() -> list[Table]:
    """Two tables: the default SmallCNN under each format, and the closed-form LLM weight sizes."""
    cases = {
        "FP32 (dense)": (None, None),
        "FP16 / BF16": (None, lambda w: TensorFormat(bits=16)),
        "INT8 per-channel": (None, _int(8)),
        "INT4 group-32": (None, _int(4, 32)),
        "2:4 + FP16": (_nm_where_possible, _with_nm(lambda w: TensorFormat(bits=16))),
        "2:4 + INT8 per-channel": (_nm_where_possible, _with_nm(_int(8))),
        "90% magnitude, FP32 + bitmask": (lambda w: magnitude_mask(w, 0.9), None),
        "90% magnitude + INT8 + bitmask": (lambda w: magnitude_mask(w, 0.9), _int(8)),
        "k-means K=16 (4-bit indices)": (None, lambda w: TensorFormat(codebook_size=16)),
    }
    model_table = Table(
        "Size accounting: SmallCNN (38,282 parameters), every parameter counted",
        ["format", "sparsity (all parameters)", "bytes", "vs FP32"],
    )
    for name, (mask_fn, fmt_fn) in cases.items():
        s = compression_summary(_formatted(mask_fn, fmt_fn))
        model_table.rows.append([name, f"{s.sparsity:.1%}", f"{s.bytes:,.0f}", f"{s.ratio:.2f}×"])
    model_table.notes.append(
        "Biases stay FP32; the 1-input-channel first conv cannot take 2:4 and stays dense in the 2:4 rows. "
        "Scales are FP32, N:M positions 2 bits per kept value, unstructured masks 1 bit per weight."
    )
    llm = Table("Size accounting: weights of LLMs (closed form)", ["model", "format", "GB", "vs FP32"])
    for params, label in ((7e9, "7B"), (13e9, "13B")):
        for fmt in ("fp32", "fp16", "int8", "int4", "int2"):
            llm.rows.append(
                [label, fmt.upper(), f"{model_bytes(params, fmt) / 1e9:g}", f"{32 / model_bytes(1, fmt) / 8:g}×"]
            )
    return [model_table, llm]
