"""Your own model: a LightningModule and a LightningDataModule written as a user would, with no base class from
this package, and trained by ``scripts/train.py`` through a config folder outside ``conf/``.

The README's "Your own model" section runs them::

    python scripts/train.py --config-dir examples/my_conf model=rescnn data=my_digits +compress=prune_24

``examples/my_conf/model/rescnn.yaml`` and ``examples/my_conf/data/my_digits.yaml`` name these classes by
``_target_``; in your project they would name ``my_project.models.ResCNN`` (importable through ``PYTHONPATH``
or ``pip install -e .``).

``ResCNN``'s stem is ``Conv2d(1, width)``: its input width, 1, is not divisible by 4, so the ``prune_24`` recipe
skips it (with a logged line) and makes every other Conv / Linear 2:4 sparse.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset, random_split


class ResidualBlock(nn.Module):
    """Two 3×3 convs with a skip connection: ``x + conv2(relu(conv1(x)))``, then ReLU; shape-preserving.

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ResCNN(pl.LightningModule):
    """A small ResNet-style image classifier: a stem conv, residual blocks, 2×2 average pooling, a Linear head.

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)`` for H, W >= 2. Layer names (what ``targets`` /
    ``ignore`` regexes match): ``stem``, ``blocks.{i}.conv1``, ``blocks.{i}.conv2``, ``head``. Logs
    ``train/loss``, ``val/loss``, ``val/acc`` and ``test/acc``.

    Args:
        num_classes: output classes.
        in_channels: image channels (1 for grey images).
        width: channels of the stem and of every block.
        num_blocks: residual blocks.
        lr: Adam's learning rate.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, width: int = 16, num_blocks: int = 2, lr: float = 1e-2
    ) -> None:
        super().__init__()
        if num_classes < 2 or in_channels < 1 or width < 1 or num_blocks < 0:
            raise ValueError(
                f"need num_classes >= 2, in_channels >= 1, width >= 1, num_blocks >= 0; got num_classes="
                f"{num_classes}, in_channels={in_channels}, width={width}, num_blocks={num_blocks}"
            )
        self.save_hyperparameters()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(num_blocks)))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(self.pool(x).flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(dim=-1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(dim=-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class MyDigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8×8 digits as ``(B, 1, 8, 8)`` images in [0, 1], split 70 / 15 / 15 at random.

    A plain LightningDataModule (``setup`` and the three dataloaders), written as your own would be.

    Args:
        batch_size: batch size of every loader.
        seed: the split's and the shuffling's seed.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size, self.seed = batch_size, seed
        self.parts: dict[str, Subset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.parts:
            return
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        dataset = TensorDataset(x, torch.tensor(labels, dtype=torch.long))
        split = random_split(dataset, [0.7, 0.15, 0.15], generator=torch.Generator().manual_seed(self.seed))
        self.parts = dict(zip(("train", "val", "test"), split, strict=True))

    def train_dataloader(self) -> DataLoader:
        shuffled = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.parts["train"], batch_size=self.batch_size, shuffle=True, generator=shuffled)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.parts["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.parts["test"], batch_size=self.batch_size)
