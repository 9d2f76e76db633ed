"""The files serving stacks load, by format name: one entry point for the scripts (``save=`` / ``export.format=``).

- ``"compressed-tensors"``: a Hugging Face folder transformers and vLLM load (:func:`save_compressed`);
- ``"gguf"``: ``model.gguf`` in a folder, for llama.cpp / Ollama and transformers' GGUF loader (:func:`save_gguf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lightning_compress.export.compressed import save_compressed
from lightning_compress.export.gguf import save_gguf
from lightning_compress.export.layer import ExportedLayer
from lightning_compress.nn.fake_quant import is_fake_quant

SERVING_FORMATS = ("compressed-tensors", "gguf")
GGUF_FILE = "model.gguf"


def check_serving_format(fmt: str | None) -> str | None:
    """``fmt`` if it is None or one of :data:`SERVING_FORMATS`; ValueError naming it otherwise."""
    if fmt is not None and fmt not in SERVING_FORMATS:
        raise ValueError(f"format={fmt!r} is not a serving format; allowed: null, {', '.join(SERVING_FORMATS)}")
    return fmt


def save_for_serving(
    model: nn.Module, fmt: str, folder: str | Path, tokenizer: Any = None, tokenizer_pre: str = "default"
) -> Path:
    """Write ``model`` in serving format ``fmt`` under ``folder``; returns what a client opens (the folder, or the
    ``.gguf`` file in it). ``tokenizer_pre``: llama.cpp's pre-tokenizer name (GGUF only, e.g. ``"smollm"``)."""
    check_serving_format(fmt)
    if fmt == "compressed-tensors":
        return save_compressed(model, folder, tokenizer)
    return save_gguf(model, Path(folder) / GGUF_FILE, tokenizer, tokenizer_pre=tokenizer_pre)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model a serving format writes: ``model`` itself or its outermost ``PreTrainedModel``.

    Raises:
        TypeError: there is none. ValueError: quantized layers outside it (the file would lose them), named.
    """
    for name, module in model.named_modules():  # outermost first
        if hasattr(module, "save_pretrained") and hasattr(module, "config"):
            prefix = f"{name}." if name else ""
            outside = [n for n, m in model.named_modules() if (is_fake_quant(m) or isinstance(m, ExportedLayer))
                       and not n.startswith(prefix)]  # fmt: skip
            if outside:
                raise ValueError(
                    f"quantized layers {outside[:5]} lie outside the transformers model {name!r}, so a serving "
                    "format would not hold them; add them to the recipe's ignore, or use export.format=null"
                )
            return module
    raise TypeError(f"{type(model).__name__} holds no transformers model; allowed with export.format: one that does")
