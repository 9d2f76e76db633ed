"""Fine-tuning a causal language model: a LightningModule around any Hugging Face causal LM, and Brown corpus token
windows to train it on (disjoint from the windows its perplexity is measured on)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics.text import Perplexity

from lightning_compress.calibration.batches import split_batch, token_mask
from lightning_compress.distillation import adamw_warmup_decay, logits_of
from lightning_compress.evaluation import IGNORE_INDEX, next_token_loss
from lightning_compress.examples.brown import find_brown, split_documents
from lightning_compress.examples.datamodule import InMemoryDataModule


class CausalLMModule(pl.LightningModule):
    """Train any Hugging Face causal LM on next-token prediction; logs ``train/loss``, ``val/loss``,
    ``val/perplexity`` and ``test/perplexity`` (token-weighted, as :func:`~lightning_compress.evaluation.perplexity`).

    Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels`` (the input ids, ``-100`` where no loss is
    wanted: Hugging Face's convention, shifted here), as :class:`BrownLMDataModule` yields them. The compression
    callbacks work on it unchanged (layer names start with ``model.``; the output embeddings, tied to the input
    ones, are left out by default), and so does :class:`~lightning_compress.DistillationModule` as student or
    teacher: ``forward`` returns the logits.

    YAML (``conf/model/smollm2_lm.yaml``)::

        _target_: lightning_compress.examples.causal_lm.CausalLMModule
        pretrained: smollm2
        lr: 2.0e-5

    Python::

        module = CausalLMModule("smollm2", lr=2e-5)
        L.Trainer(max_steps=40, precision="bf16-mixed").fit(module, BrownLMDataModule())

    Args:
        pretrained: a model name or folder for :func:`~lightning_compress.examples.pretrained.load_pretrained`
            (``"smollm2"``: the installed SmolLM2-135M-Instruct); ignored when ``model`` is given.
        model: a causal LM to train (its ``forward(input_ids=..., attention_mask=...)`` returns logits or an output
            with ``.logits``).
        lr: AdamW's peak learning rate (linear warmup over ``warmup_fraction`` of the run, then linear decay to 0).
        weight_decay: AdamW's decoupled weight decay.
        warmup_fraction: the share of the run spent warming up, in ``[0, 1)``.

    Raises:
        ValueError: neither ``pretrained`` nor ``model``, or a bad optimizer setting.
    """

    causal_lm = True  # DistillationModule distils it token by token (evaluation.is_causal_lm)

    def __init__(
        self,
        pretrained: str | None = "smollm2",
        model: nn.Module | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if model is None and not pretrained:
            raise ValueError("CausalLMModule needs pretrained=<name or folder> or model=<a causal LM>")
        adamw_warmup_decay([], lr, weight_decay, warmup_fraction, 1)  # validates the optimizer settings now
        if model is None:
            from lightning_compress.examples.pretrained import load_pretrained

            model = load_pretrained(pretrained, task="causal_lm")[0]
        self.model = model.train()
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The ``(B, T, vocab)`` next-token logits."""
        return logits_of(self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs))

    def _loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        inputs, labels = split_batch(batch)
        labels = inputs["input_ids"] if labels is None else labels
        return next_token_loss(self(**inputs), labels, token_mask(inputs))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)[0]
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str, metric: Perplexity) -> None:
        loss, logits, targets = self._loss(batch)
        metric(logits.float(), targets)
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log(f"{stage}/perplexity", metric, prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_ppl)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_ppl)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters, linear warmup then linear decay, stepped per optimizer step."""
        params = [p for p in self.parameters() if p.requires_grad]
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return adamw_warmup_decay(params, self.lr, self.weight_decay, self.warmup_fraction, total)


class TokenWindows(Dataset):
    """Fixed-length token windows ``(N, T)``; item ``i`` is ``{"input_ids", "attention_mask", "labels"}`` of ``(T,)``
    (the labels are the input ids: a causal LM shifts them)."""

    def __init__(self, windows: Tensor) -> None:
        if windows.dim() != 2 or windows.dtype != torch.long:
            raise ValueError(f"windows must be (N, T) int64 token ids, got {tuple(windows.shape)} {windows.dtype}")
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class BrownLMDataModule(InMemoryDataModule):
    """Next-token prediction on the Brown corpus in ``seq_len``-token windows of running text.

    The even documents train (the text ``scripts/ptq.py`` calibrates on); the odd ones are held out: the test split is
    their first ``test_sequences`` windows, exactly the windows ``scripts/ptq.py lm=smollm2`` and the benchmarks
    measure perplexity on, and validation the ``val_sequences`` windows after those (disjoint from test). Documents
    are ordered by :func:`~lightning_compress.examples.brown.split_documents` (``seed``) and cut by
    :func:`~lightning_compress.examples.text.token_sequences`.

    YAML (``conf/data/brown_lm.yaml``)::

        _target_: lightning_compress.examples.causal_lm.BrownLMDataModule
        pretrained: smollm2
        seq_len: 256
        batch_size: 8

    Args:
        pretrained: the model whose tokenizer to use (resolved as
            :func:`~lightning_compress.examples.pretrained.load_tokenizer` resolves it).
        seq_len: tokens per window, >= 2.
        batch_size: windows per batch.
        train_sequences: at most this many training windows (None: all of the even documents', about 2,800 of
            256 tokens with SmolLM2's tokenizer).
        val_sequences, test_sequences: held-out windows for validation and test, >= 1 each.
        seed: the document order's seed.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        pretrained: str = "smollm2",
        seq_len: int = 256,
        batch_size: int = 8,
        train_sequences: int | None = None,
        val_sequences: int = 16,
        test_sequences: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        for name, value in (("val_sequences", val_sequences), ("test_sequences", test_sequences)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if train_sequences is not None and (not isinstance(train_sequences, int) or train_sequences < 1):
            raise ValueError(f"train_sequences must be None or a positive int, got {train_sequences!r}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
        self.pretrained, self.seq_len, self.seed = pretrained, seq_len, seed
        self.train_sequences, self.val_sequences, self.test_sequences = train_sequences, val_sequences, test_sequences

    def prepare_data(self) -> None:
        find_brown()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from lightning_compress.examples.pretrained import load_tokenizer
        from lightning_compress.examples.text import token_sequences

        tokenizer = load_tokenizer(self.pretrained)
        train_docs, held_out = split_documents(self.seed)

        def windows(docs: list[str], limit: int | None) -> Tensor:
            return torch.cat([b["input_ids"] for b in token_sequences(tokenizer, docs, self.seq_len, 256, limit)])

        held = windows(held_out, self.test_sequences + self.val_sequences)
        if held.shape[0] < self.test_sequences + self.val_sequences:
            raise ValueError(
                f"the held-out documents give {held.shape[0]} windows of {self.seq_len} tokens, fewer than "
                f"test_sequences + val_sequences = {self.test_sequences + self.val_sequences}"
            )
        self.splits = {
            "train": TokenWindows(windows(train_docs, self.train_sequences)),
            "val": TokenWindows(held[self.test_sequences :]),
            "test": TokenWindows(held[: self.test_sequences]),
        }
