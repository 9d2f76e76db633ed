"""BrownLMDataModule's splits and CausalLMModule's loss, perplexity and checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_compress.evaluation import perplexity
from lightning_compress.examples.brown import split_documents
from lightning_compress.examples.causal_lm import BrownLMDataModule, CausalLMModule, TokenWindows
from lightning_compress.examples.pretrained import load_tokenizer
from lightning_compress.examples.text import token_sequences
from tests.tiny_models import VOCAB, tiny_llama


def test_brown_lm_splits_train_on_even_documents_and_test_on_ptqs_perplexity_windows():
    dm = BrownLMDataModule(seq_len=64, val_sequences=4, test_sequences=8, train_sequences=20)
    dm.setup()
    tokenizer = load_tokenizer("smollm2")
    even, odd = split_documents(0)
    ptq_windows = torch.cat([b["input_ids"] for b in token_sequences(tokenizer, odd, 64, 8, 12)])
    assert torch.equal(dm.splits["test"].windows, ptq_windows[:8])  # what scripts/ptq.py lm=smollm2 measures
    assert torch.equal(dm.splits["val"].windows, ptq_windows[8:12])  # disjoint from test
    train = torch.cat([b["input_ids"] for b in token_sequences(tokenizer, even, 64, 8, 20)])
    assert torch.equal(dm.splits["train"].windows, train)
    item = dm.splits["train"][0]
    assert torch.equal(item["labels"], item["input_ids"]) and item["attention_mask"].all()
    with pytest.raises(ValueError, match="val_sequences must be a positive int, got 0"):
        BrownLMDataModule(val_sequences=0)


def test_causal_lm_module_trains_next_tokens_logs_perplexity_and_checkpoints_the_models_keys(tmp_path):
    torch.manual_seed(0)
    data = TokenWindows(torch.randint(0, VOCAB, (16, 12)))
    module = CausalLMModule(model=tiny_llama(), lr=1e-2)
    batches = [{k: v for k, v in data[i : i + 4].items() if k != "labels"} for i in range(0, 16, 4)]
    before = perplexity(module.model, batches)
    trainer = pl.Trainer(accelerator="cpu", max_steps=12, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    after = perplexity(module.model, batches)
    assert after < before  # it learned the training windows
    tested = trainer.test(module, DataLoader(data, batch_size=4), verbose=False)[0]
    assert tested["test/perplexity"] == pytest.approx(after, rel=1e-4)  # the metric is the token-weighted perplexity
    state = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=True)["state_dict"]
    plain = tiny_llama()
    plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    with pytest.raises(ValueError, match="needs pretrained"):
        CausalLMModule(pretrained=None)
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        CausalLMModule(model=tiny_llama(), warmup_fraction=1.0)
