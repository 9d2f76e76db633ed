"""GGUF files for llama.cpp / Ollama, written from our own codes through the ``gguf`` package (by llama.cpp).

GGUF's block types hold 32 consecutive inputs of a row with one fp16 scale ``d`` (and, Q4_1, one fp16 offset ``m``):

- ``Q4_0``: ``w = d · (u − 8)``, ``u`` in ``[0, 15]``: our symmetric codes of at most 4 bits, ``u = q + 8``, ``d = S``;
- ``Q4_1``: ``w = d · u + m``: our asymmetric codes of at most 4 bits, ``u = q + 8``, ``d = S``, ``m = −S · (Z + 8)``;
- ``Q8_0``: ``w = d · q``, ``q`` int8: our symmetric codes of at most 8 bits.

A layer whose groups are whole blocks (a group size or, per channel, an input width that is a multiple of 32)
maps onto them exactly, with its scales repeated per block; the only rounding is ``S`` (and ``m``) to fp16, which
``save_gguf`` reports (none for Q4_0 / Q8_0 when the quantizer made fp16 scales:
``scale_dtype="float16"``). Layers that fit no block type (codebooks, 5-8-bit zero-points, other groups) are rounded by
``gguf``'s own quantizer to the nearest type, with a warning naming them. Float tensors are written as F32 (exact),
or their matrices (the embedding, float Linears) as F16 with ``float_type="F16"``; norms stay F32 (llama.cpp's rule).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.export.io import atomic_file
from lightning_compress.functional.quant import expand_params
from lightning_compress.nn.quantized import QuantizedWeight

log = logging.getLogger(__name__)

BLOCK = 32
ARCHITECTURES = ("llama",)
FLOAT_TYPES = ("F32", "F16")


def gguf_type(weight: QuantizedWeight, in_features: int) -> str | None:
    """The GGUF block type our codes map onto exactly (``"Q4_0"``, ``"Q4_1"``, ``"Q8_0"``), or None.

    Exact when the codes are integers, their groups (per channel: the row) hold whole blocks of 32, and the width
    fits: at most 4 bits (symmetric Q4_0, asymmetric Q4_1) or at most 8 bits symmetric (Q8_0).
    """
    if weight.format != "int" or in_features % BLOCK:
        return None
    group = in_features if weight.scale.numel() == 1 or weight.scale.shape[-1] == 1 else weight.group_size
    if group is None or group % BLOCK or weight.scale.shape[-1] not in (1, in_features // group):
        return None
    if weight.bits <= 4:
        return "Q4_0" if weight.symmetric else "Q4_1"
    return "Q8_0" if weight.symmetric else None


def block_bytes(weight: QuantizedWeight, qtype: str) -> np.ndarray:
    """The GGUF bytes of ``weight`` in block type ``qtype``, uint8 ``(out, in / 32 · bytes per block)``.

    Per block: ``d`` (fp16), for Q4_1 ``m`` (fp16), then the codes: Q8_0 32 int8; Q4 16 bytes, byte ``j`` holding
    input ``j`` in its low nibble and input ``j + 16`` in its high one (``gguf.quants``' layout).
    """
    codes = weight.codes.to(torch.int16)
    out, k = codes.shape
    scale = expand_params(weight.scale.float(), codes.shape).expand(out, k)[:, ::BLOCK]  # (out, in / 32): one per block
    parts = [scale.half().flatten().contiguous().view(torch.uint8).reshape(out, -1, 2)]  # fp16 d: 2 bytes per block
    if qtype == "Q4_1":
        offset = -scale * (expand_params(weight.zero_point.float(), codes.shape).expand(out, k)[:, ::BLOCK] + 8)
        parts.append(offset.half().flatten().contiguous().view(torch.uint8).reshape(out, -1, 2))
    blocks = codes.reshape(out, k // BLOCK, BLOCK)
    if qtype == "Q8_0":
        parts.append(blocks.to(torch.int8).view(torch.uint8))
    else:
        u = (blocks + 8).to(torch.uint8)
        parts.append(u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << 4))
    return torch.cat(parts, dim=-1).reshape(out, -1).numpy()


def scale_rounding(weight: QuantizedWeight, qtype: str) -> float:
    """The largest relative change fp16 makes to the block scales (and Q4_1 offsets): 0 when they are fp16 values."""
    s = weight.scale.float()
    values = [s] if qtype != "Q4_1" else [s, s * (weight.zero_point.float() + 8)]
    return max(float(((v.half().float() - v).abs() / v.abs().clamp_min(1e-30)).max()) for v in values)


def llama_row_order(n_head: int, out_features: int) -> Tensor:
    """The row order llama.cpp stores a Llama ``q_proj`` / ``k_proj`` in (its converter's per-head rotary permute;
    transformers' GGUF loader undoes it): head ``h``'s rows ``(2, d/2)`` interleaved as ``(d/2, 2)``."""
    rows = torch.arange(out_features)
    return rows.reshape(n_head, 2, out_features // n_head // 2).transpose(1, 2).reshape(-1)


def permuted(weight: QuantizedWeight, order: Tensor) -> QuantizedWeight:
    """``weight`` with its rows (codes, scales, zero-points) in ``order``."""
    scale = weight.scale if weight.scale.numel() == 1 else weight.scale[order]
    zero = None if weight.zero_point is None or weight.zero_point.numel() == 1 else weight.zero_point[order]
    return QuantizedWeight(weight.codes[order], scale, zero, weight.bits, weight.group_size)


def check_llama(model: nn.Module) -> Any:
    """``model.config`` if ``model`` is a Llama-architecture transformers causal LM, else ValueError / TypeError."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={config.model_type!r} has no GGUF writer here; allowed: {list(ARCHITECTURES)}")
    return config


def _metadata(writer: Any, config: Any) -> None:
    """llama.cpp's ``llama.*`` keys from the transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> None:
    """A byte-level BPE tokenizer's vocabulary, types, merges and special ids (``tokenizer.ggml.*``)."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added, special = tokenizer.get_added_vocab(), set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def gguf_tensors(model: nn.Module, config: Any, float_type: str = "F32") -> list[tuple[str, np.ndarray, str | None]]:
    """``(GGUF name, data, block type or None for float)`` of every tensor, quantized layers from their codes; float
    matrices as ``float_type`` (``"F32"`` or ``"F16"``), vectors as F32.

    Raises:
        ValueError: a tensor with no llama.cpp name, or a quantized layer GGUF cannot hold (named).
    """
    import gguf

    from lightning_compress.export.compressed import layer_quantization

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    quantized = {n: q for n, m in model.named_modules() if (q := layer_quantization(n, m, "GGUF")) is not None}
    prefixes = tuple(f"{n}." for n in quantized)
    out: list[tuple[str, np.ndarray, str | None]] = []
    rounded, rescaled = [], {}
    for key, t in model.state_dict().items():
        if key.startswith(prefixes) or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {key!r} has no llama.cpp name")
        data = t.detach().float().cpu().numpy()
        out.append((name, data.astype(np.float16) if float_type == "F16" and data.ndim == 2 else data, None))
    for layer, q in quantized.items():
        name = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        weight = q.weight
        if layer.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if layer.endswith("q_proj") else config.num_key_value_heads
            weight = permuted(weight, llama_row_order(heads, weight.codes.shape[0]))
        qtype = gguf_type(weight, weight.codes.shape[1])
        if qtype is None:  # not our grid: gguf's own rounding onto the nearest type
            qtype = "Q4_0" if weight.format == "int" and weight.bits <= 4 else "Q8_0"
            data = gguf.quants.quantize(weight.dequantize().numpy(), gguf.GGMLQuantizationType[qtype])
            rounded.append(layer)
        else:
            data = block_bytes(weight, qtype)
            rescaled[layer] = scale_rounding(weight, qtype)
        out.append((name, data, qtype))
    if rounded:
        log.warning("GGUF: %d layers fit no block type exactly and were rounded by gguf: %s", len(rounded), rounded)
    changed = {n: r for n, r in rescaled.items() if r > 0}
    if changed:
        worst = max(changed, key=changed.get)
        log.warning("GGUF: fp16 block scales change %d layers' scales by up to %.2e (relative, %s); the codes are "
                    "ours exactly", len(changed), changed[worst], worst)  # fmt: skip
    return out


def _file_type(tensors: list[tuple[str, np.ndarray, str | None]], float_type: str) -> Any:
    """``general.file_type``: the block type most layers use (``MOSTLY_Q4_0``, ...), else the float type."""
    import gguf

    counts: dict[str, int] = {}
    for *_, qtype in tensors:
        if qtype is not None:
            counts[qtype] = counts.get(qtype, 0) + 1
    if not counts:
        return gguf.LlamaFileType.MOSTLY_F16 if float_type == "F16" else gguf.LlamaFileType.ALL_F32
    return gguf.LlamaFileType[f"MOSTLY_{max(counts, key=counts.get)}"]


def save_gguf(
    model: nn.Module, path: str | Path, tokenizer: Any = None, tokenizer_pre: str = "default", float_type: str = "F32"
) -> Path:
    """Write a Llama-architecture causal LM as one GGUF file that llama.cpp, Ollama and transformers read.

    Quantized layers (fake-quant layers a callback left, or ``Int8Linear`` / ``Int4Linear``) are written from their
    codes in Q4_0 / Q4_1 / Q8_0 (see the module docstring); float tensors as F32. Checked whole before the file is
    written; written under a temporary name and renamed, so a crash leaves no half file. ``model`` is not changed.

    Args:
        model: the transformers Llama-architecture model.
        path: the ``.gguf`` file to write.
        tokenizer: its byte-level BPE tokenizer (what llama.cpp needs to run it); None writes the weights only.
        tokenizer_pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``, e.g. ``"smollm"``).
        float_type: ``"F32"`` (exact) or ``"F16"`` (half the bytes) for the float matrices, e.g. the embedding.

    Returns:
        ``path`` as a Path.
    """
    import gguf

    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type={float_type!r} is not supported; allowed: {list(FLOAT_TYPES)}")
    config = check_llama(model)
    tensors = gguf_tensors(model, config, float_type)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, "llama")
        _metadata(writer, config)
        writer.add_file_type(_file_type(tensors, float_type))
        if tokenizer is not None:
            _tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=None if qtype is None else gguf.GGMLQuantizationType[qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(path, write)
    return path
