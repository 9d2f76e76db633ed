"""Tiny Hugging Face models built from a config (no download), and token batches for them."""

from __future__ import annotations

import torch

VOCAB = 100


def tiny_bert(layers: int = 2, hidden: int = 32):
    """A 2-layer BertModel (post-LN encoder) with random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden)  # fmt: skip
    return BertModel(cfg)


def tiny_llama(layers: int = 2, hidden: int = 32):
    """A 2-layer LlamaForCausalLM (pre-RMSNorm decoder, grouped-query attention) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden)  # fmt: skip
    return LlamaForCausalLM(cfg)


def token_batches(n: int, batch: int = 4, seq: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` tokenizer-style batches: ``input_ids`` and an ``attention_mask`` with some padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 3 :] = 0
        out.append({"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g), "attention_mask": mask})
    return out
