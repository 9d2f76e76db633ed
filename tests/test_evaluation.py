"""perplexity() against a slow per-token reference and against Hugging Face's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_compress.evaluation import perplexity
from tests.tiny_models import tiny_bert, tiny_llama, token_batches


def _reference(model, batches) -> float:
    """Sum over every real token but each sequence's first of -log p(token | tokens before), over their count."""
    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            for i in range(len(b["input_ids"])):
                for t in range(1, b["input_ids"].shape[1]):
                    if b["attention_mask"][i, t]:
                        nll -= torch.log_softmax(logits[i, t - 1], -1)[b["input_ids"][i, t]].item()
                        n += 1
    return math.exp(nll / n)


def test_perplexity_is_the_token_weighted_nll_without_padding():
    model, batches = tiny_llama(), token_batches(3, batch=3, seq=12)
    batches[1]["attention_mask"][2, 5:] = 0  # right padding of several lengths
    got = perplexity(model, batches)
    assert model.training  # the model's mode is restored
    assert got == pytest.approx(_reference(model, batches), rel=1e-5)
    with_labels = [{**b, "labels": b["input_ids"]} for b in batches]  # labels in the batch are ignored
    assert perplexity(model, with_labels) == pytest.approx(got, rel=1e-6)


def test_perplexity_of_unpadded_sequences_is_hugging_faces_loss():
    model, ids = tiny_llama(), torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, [ids]) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_rejects_what_it_cannot_score():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no token to predict"):
        perplexity(model, [{"input_ids": torch.ones(2, 1, dtype=torch.long)}])
    with pytest.raises(TypeError, match=r"needs \(B, T, vocab\) logits"):
        perplexity(tiny_bert().eval(), token_batches(1))  # an encoder's hidden states are not next-token logits
