"""Data modules and example models: seeded splits, Fashion-MNIST from Debian's files, LeNet-300-100."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress.data import FashionMNISTDataModule, read_idx, seeded_split
from lightning_compress.models import LeNet300


def test_seeded_split_is_seeded_disjoint_and_complete() -> None:
    train, val, test = seeded_split(1797, (0.15, 0.15), seed=0)
    assert (len(train), len(val), len(test)) == (1257, 270, 270)
    assert torch.equal(torch.cat([train, val, test]).sort().values, torch.arange(1797))
    again = seeded_split(1797, (0.15, 0.15), seed=0)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not torch.equal(val, seeded_split(1797, (0.15, 0.15), seed=1)[1])


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_and_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    for prefix, n in (("train", 12), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:n])  # plain, as torchvision extracts them
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])  # gzipped, as Debian ships them
    assert torch.equal(read_idx(str(raw / "train-images-idx3-ubyte")), torch.from_numpy(images.astype(np.uint8)))
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=2)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [10, 2, 4]
    x = dm.splits["test"].tensors[0]
    expected = (torch.from_numpy(images[:4]).float() / 255 - dm.mean) / dm.std
    torch.testing.assert_close(x, expected.unsqueeze(1))


def test_missing_files_name_the_package_and_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*download=True"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


@pytest.fixture(scope="module")
def fashion() -> FashionMNISTDataModule:
    # ./dev.sh test installs the Debian package first; a missing dataset is a failure, not a skip
    dm = FashionMNISTDataModule(seed=0)
    dm.setup()
    return dm


def test_fashion_mnist_splits_shapes_and_statistics(fashion: FashionMNISTDataModule) -> None:
    sizes = {split: len(ds) for split, ds in fashion.splits.items()}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    x, y = next(iter(fashion.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    images, labels = fashion.splits["train"].tensors
    assert abs(images.mean().item()) < 0.02 and abs(images.std().item() - 1) < 0.02
    for split in ("train", "val", "test"):
        counts = fashion.splits[split].tensors[1].bincount(minlength=10)
        assert len(counts) == 10 and counts.min() > 0
    assert fashion.splits["test"].tensors[1][:8].tolist() == [9, 2, 1, 1, 6, 1, 4, 6]  # the official test order


def test_fashion_mnist_split_depends_only_on_seed(fashion: FashionMNISTDataModule) -> None:
    same, other = FashionMNISTDataModule(seed=0), FashionMNISTDataModule(seed=1)
    same.setup()
    other.setup()
    val = fashion.splits["val"].tensors
    assert all(torch.equal(a, b) for a, b in zip(val, same.splits["val"].tensors, strict=True))
    assert not torch.equal(val[0], other.splits["val"].tensors[0])


def test_lenet300_shape_and_parameter_count() -> None:
    net = LeNet300()
    assert net(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert sum(p.numel() for p in net.parameters()) == 266_610
    assert [m.in_features % 4 for m in net.modules() if isinstance(m, nn.Linear)] == [0, 0, 0]  # 2:4 fits every layer
