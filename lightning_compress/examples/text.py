"""Text batching (tokenized calibration batches, padding, length-grouped batches) and the Brown genre-group
classification task (informative vs imaginative sentences) for fine-tuning and distilling text models."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from lightning_compress.examples.brown import (
    BROWN_GROUP_LABELS,
    BrownDocument,
    find_brown,
    read_brown,
    sample_sentences,
    split_brown_documents,
)
from lightning_compress.examples.datamodule import InMemoryDataModule, check_fractions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def token_sequences(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    seq_len: int,
    batch_size: int = 8,
    limit: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches of whole ``seq_len``-token windows of running text, for calibration and perplexity.

    The documents are tokenized one by one (no special tokens), joined with the tokenizer's end-of-sequence token
    (when it has one) into one stream, and cut into consecutive non-overlapping windows; the incomplete tail is
    dropped, so every token is real (``attention_mask`` all ones) and each window is ``seq_len`` long.

    Args:
        tokenizer: a Hugging Face tokenizer.
        documents: the texts, in order (e.g. whole Brown documents, calibration and evaluation from disjoint ones).
        seq_len: tokens per window, >= 2 (a window predicts ``seq_len - 1`` of them).
        batch_size: windows per batch (the last batch may hold fewer).
        limit: at most this many windows (the first ones); None keeps all.

    Returns:
        Batches ``{"input_ids": (B, seq_len) int64, "attention_mask": (B, seq_len)}``.

    Raises:
        ValueError: ``seq_len < 2``, ``batch_size`` or ``limit`` below 1, or text shorter than one window.
    """
    if seq_len < 2 or batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(
            f"seq_len must be >= 2, batch_size and limit >= 1, got seq_len={seq_len}, batch_size={batch_size}, "
            f"limit={limit}"
        )
    if not documents or isinstance(documents, str):
        raise ValueError("documents must be a non-empty sequence of strings")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for i, text in enumerate(documents):
        stream += (eos if i else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(stream) // seq_len if limit is None else min(limit, len(stream) // seq_len)
    if n == 0:
        raise ValueError(f"the documents hold {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    windows = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


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
        pretrained: the model whose tokenizer to use, resolved as
            :func:`~lightning_compress.examples.pretrained.load_pretrained` resolves it.
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
        check_fractions((val_fraction, test_fraction))
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
        from lightning_compress.examples.pretrained import load_tokenizer

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
