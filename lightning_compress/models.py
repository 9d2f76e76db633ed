"""Example models for the Hydra entry point: a small CNN, LeNet-300-100 and a generic image classifier LightningModule.

The library works on any LightningModule; these exist so ``scripts/train.py`` has a default job.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn


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
