"""Evaluating compressed language models: token-weighted perplexity of a causal LM over batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from lightning_compress.calibration.batches import call_model, model_device, split_batch, token_mask
from lightning_compress.calibration.capture import eval_mode

IGNORE_INDEX = -100  # targets excluded from the perplexity (padding), as Hugging Face's labels use it


def _logits(output: Any) -> Tensor:
    """The ``(B, T, V)`` logits of a causal LM's output: a Hugging Face output's ``.logits``, a tuple's first item or
    the tensor itself."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError(
            f"the model returned {type(output).__name__}; perplexity needs (B, T, vocab) logits (a causal LM's "
            "output, its .logits, or a tuple starting with them)"
        )
    return logits


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Any]) -> float:
    """Perplexity ``exp(sum NLL / n)`` of a causal language model over ``batches``, every real token weighted alike.

    Each batch is what a tokenizer gives (``{"input_ids": (B, T), "attention_mask": (B, T)}``; labels, if any, are
    ignored) or an ``input_ids`` tensor. Token ``t`` is predicted from the tokens before it, so each sequence
    contributes its real tokens but the first; padding (``attention_mask == 0``) is never a target. The NLL is
    computed in float32 (torchmetrics' ``Perplexity``) whatever the model's dtype, in eval mode, without gradients.

    Raises:
        ValueError: the batches hold no token to predict. TypeError: the model does not return logits.
    """
    metric = Perplexity(ignore_index=IGNORE_INDEX)
    device = model_device(model)
    with eval_mode(model):
        for batch in batches:
            inputs, _ = split_batch(batch)
            ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
            if not isinstance(ids, Tensor) or ids.dim() != 2:
                raise TypeError(f"batches must hold (B, T) input_ids, got {type(ids).__name__}")
            logits = _logits(call_model(model, inputs))
            mask = token_mask(inputs)
            targets = ids.to(device).clone()
            if mask is not None:
                targets[~mask.to(device)] = IGNORE_INDEX
            metric.update(logits[:, :-1].float().cpu(), targets[:, 1:].cpu())
    if int(metric.count) == 0:
        raise ValueError("batches hold no token to predict (each sequence needs at least two real tokens)")
    return float(metric.compute())
