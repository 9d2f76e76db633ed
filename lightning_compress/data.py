"""Data for the Hydra entry point: scikit-learn's bundled 8×8 digits (no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def seeded_split(n: int, fractions: tuple[float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into train / val / test index tensors.

    Args:
        n: number of samples.
        fractions: ``(val_fraction, test_fraction)``, each in ``(0, 1)``, summing below 1.
        seed: the permutation's seed; the same seed gives the same split on every machine and rank.
    """
    val_f, test_f = fractions
    if not (0 < val_f < 1 and 0 < test_f < 1 and val_f + test_f < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {fractions}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_f), round(n * test_f)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1,797 bundled 8×8 handwritten digits as ``(B, 1, 8, 8)`` float images in [0, 1], 10 classes.

    Args:
        batch_size: batch size of every loader.
        val_fraction, test_fraction: seeded split sizes.
        seed: the split's seed.
        num_workers: DataLoader workers (0 is fastest for this tiny set).
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.fractions = (val_fraction, test_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = seeded_split(len(y), self.fractions, self.seed)
        self.splits = {k: TensorDataset(x[i], y[i]) for k, i in (("train", train), ("val", val), ("test", test))}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
