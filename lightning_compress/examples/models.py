"""Example models: a small CNN, LeNet-300-100, a generic image classifier LightningModule and a text classifier
LightningModule fine-tuning a pretrained transformer.

The library works on any LightningModule; these exist so ``scripts/train.py`` has a default job."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from lightning_compress.examples.pretrained import load_pretrained
from lightning_compress.functional.schedules import linear_warmup_decay

if TYPE_CHECKING:
    pass


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


class TextClassifier(pl.LightningModule):
    """Cross-entropy sequence classifier around a pretrained transformer, with AdamW, linear warmup / decay and
    accuracy metrics; the fine-tuning job of the distillation recipes.

    Batches are dicts of ``(B, T)`` tensors (``input_ids``, ``attention_mask``, optionally ``token_type_ids``) plus
    ``labels: (B,)``, as :class:`~lightning_compress.examples.text.BrownGenreDataModule` serves them. Logs
    ``train/loss``, ``val/loss``, ``val/acc``, ``test/acc`` like :class:`ImageClassifier`.

    Args:
        pretrained: a model name or folder, loaded by :func:`load_pretrained` with ``task="classification"`` (a new
            head of ``num_labels`` outputs); or any module called as ``net(**inputs)`` (the batch without
            ``labels``) that returns logits ``(B, num_labels)``, or an output with a ``logits`` field (it keeps its
            train / eval mode: Lightning's ``fit`` does not switch it, so dropout stays as given).
        num_labels: classes.
        lr: AdamW's peak learning rate. 5e-5 suits epochs of 100+ steps; one Brown genre epoch of 28 steps
            (``max_sentences_per_doc=5``) reaches val/acc 0.73 with it, 0.87 with 2e-4.
        weight_decay: AdamW's decoupled weight decay, applied to matrices only (not to biases or LayerNorm weights).
        warmup_fraction: the share of all optimizer steps spent warming the learning rate up from 0; after it, the
            rate decays linearly to 0 at the trainer's last step (:func:`linear_warmup_decay`).
    """

    def __init__(
        self,
        pretrained: str | nn.Module = "all-MiniLM-L6-v2",
        num_labels: int = 2,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if num_labels < 2 or lr <= 0 or weight_decay < 0 or not 0 <= warmup_fraction < 1:
            raise ValueError(
                "need num_labels >= 2, lr > 0, weight_decay >= 0 and warmup_fraction in [0, 1), got "
                f"num_labels={num_labels}, lr={lr}, weight_decay={weight_decay}, warmup_fraction={warmup_fraction}"
            )
        self.save_hyperparameters(ignore=["pretrained"] if isinstance(pretrained, nn.Module) else None)
        if isinstance(pretrained, str):  # load_pretrained returns eval mode; Lightning's fit keeps a module's mode
            pretrained = load_pretrained(pretrained, task="classification", num_labels=num_labels)[0].train()
        self.net = pretrained
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)

    def forward(self, **inputs: Tensor) -> Tensor:
        """Logits ``(B, num_labels)`` of a batch's model inputs; a ``labels`` entry is ignored."""
        inputs.pop("labels", None)
        out = self.net(**inputs)
        logits = out if isinstance(out, Tensor) else out["logits"] if isinstance(out, dict) else out.logits
        if logits.dim() != 2 or logits.shape[1] != self.hparams.num_labels:
            raise ValueError(f"net must return logits (B, {self.hparams.num_labels}), got {tuple(logits.shape)}")
        return logits

    def _logits_and_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(**batch)
        return logits, F.cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        _, loss = self._logits_and_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.val_acc(logits, batch["labels"])
        self.log("val/loss", loss, batch_size=len(batch["labels"]), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(batch["labels"]))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.test_acc(self(**batch), batch["labels"])
        self.log("test/acc", self.test_acc, batch_size=len(batch["labels"]))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(**batch).argmax(dim=-1)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("TextClassifier's learning-rate decay needs a finite run: set max_steps or max_epochs")
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        warmup = int(self.hparams.warmup_fraction * total)
        schedule = functools.partial(linear_warmup_decay, warmup_steps=warmup, total_steps=int(total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
