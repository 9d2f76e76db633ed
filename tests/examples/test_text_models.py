"""TextClassifier: all-MiniLM-L6-v2 (or any module) fine-tuned on the Brown genre task with AdamW and linear warmup /
decay; real data and the real pretrained checkpoint (installed by ./dev.sh test: a missing one is a failure)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_compress.examples.models import TextClassifier
from lightning_compress.examples.pretrained import load_tokenizer
from lightning_compress.examples.text import BrownGenreDataModule
from lightning_compress.functional.schedules import linear_warmup_decay


def trainer(**kwargs: object) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    return pl.Trainer(**{**args, **kwargs})


@pytest.fixture(scope="module")
def genre() -> BrownGenreDataModule:
    dm = BrownGenreDataModule(max_sentences_per_doc=5, batch_size=16, seed=0)
    dm.setup()
    return dm


class BagOfWords(nn.Module):
    """Masked mean of token embeddings -> Linear: any module mapping a batch dict to plain logits."""

    def __init__(self, vocab_size: int, num_labels: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


class LearningRates(pl.Callback):
    """Records the learning rate of every optimizer step and the training loss."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, i: int) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def test_linear_warmup_decay_worked_example() -> None:
    assert [linear_warmup_decay(s, warmup_steps=2, total_steps=6) for s in range(7)] == [0, 0.5, 1, 0.75, 0.5, 0.25, 0]
    assert [linear_warmup_decay(s, 0, 4) for s in range(4)] == [1, 0.75, 0.5, 0.25]


def test_text_classifier_wraps_minilm(genre: BrownGenreDataModule) -> None:
    model = TextClassifier()
    assert type(model.net).__name__ == "BertForSequenceClassification" and model.net.training  # dropout on for fit
    assert model.hparams.pretrained == "all-MiniLM-L6-v2" and model.hparams.num_labels == 2
    assert all(key.startswith("net.") for key in model.state_dict())  # checkpoints hold the HF model's weights only
    batch = next(iter(genre.val_dataloader()))
    model.eval()
    with torch.no_grad():
        logits = model(**batch)
        assert logits.shape == (16, 2) and logits.dtype == torch.float32
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        torch.testing.assert_close(model(**inputs), logits)  # labels are stripped, not passed to the HF model
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}  # the batch is left as it was


def test_text_classifier_checks_arguments_and_logit_shape() -> None:
    vocab = load_tokenizer().vocab_size
    with pytest.raises(ValueError, match="warmup_fraction"):
        TextClassifier(BagOfWords(vocab), warmup_fraction=1.0)
    with pytest.raises(ValueError, match="num_labels"):
        TextClassifier(BagOfWords(vocab), num_labels=1)
    model = TextClassifier(BagOfWords(vocab, num_labels=3), num_labels=2)
    assert "pretrained" not in model.hparams  # a module is not a hyperparameter
    with pytest.raises(ValueError, match=r"logits \(B, 2\), got \(1, 3\)"):
        model(input_ids=torch.tensor([[101, 102]]), attention_mask=torch.ones(1, 2, dtype=torch.long))


def test_text_classifier_trains_with_warmup_and_linear_decay(genre: BrownGenreDataModule) -> None:
    torch.manual_seed(0)
    model = TextClassifier(BagOfWords(genre.tokenizer.vocab_size), lr=0.1, weight_decay=0.01, warmup_fraction=0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = LearningRates()
    fit = trainer(max_steps=5, limit_val_batches=2, val_check_interval=5, callbacks=[record])
    fit.fit(model, datamodule=genre)
    assert record.lrs == pytest.approx([0.0, 0.1, 0.075, 0.05, 0.025])  # 1 warmup step of 5, then linear to 0
    assert len(record.losses) == 5 and all(math.isfinite(x) for x in record.losses)
    assert {"train/loss", "val/loss", "val/acc"} <= set(fit.callback_metrics)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # every parameter trained
    decay, no_decay = fit.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p.dim() for p in decay["params"]] == [2, 2] and [p.dim() for p in no_decay["params"]] == [1]  # the bias
    assert fit.lr_scheduler_configs[0].interval == "step"


@pytest.mark.slow
def test_minilm_fine_tuning_one_short_epoch_beats_the_majority_class() -> None:
    """880 balanced training sentences (28 steps, about 90 s of CPU time) lift MiniLM well above chance."""
    pl.seed_everything(0)
    dm = BrownGenreDataModule(max_sentences_per_doc=5, batch_size=32, seed=0)
    model = TextClassifier(lr=2e-4)
    fit = trainer(max_epochs=1)
    fit.fit(model, datamodule=dm)
    # val is 280 informative : 95 imaginative sentences, so always answering "informative" scores 0.747
    assert fit.callback_metrics["val/acc"] > 0.8  # measured 0.867
    model.eval()
    with torch.no_grad():
        pairs = [(model(**b).argmax(-1), b["labels"]) for b in dm.val_dataloader()]
    pred, labels = torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    recall = [float((pred[labels == c] == c).float().mean()) for c in (0, 1)]
    assert min(recall) > 0.7  # both classes recognised (measured 0.87 informative, 0.85 imaginative)
    assert fit.test(model, datamodule=dm, verbose=False)[0]["test/acc"] > 0.8  # measured 0.853
