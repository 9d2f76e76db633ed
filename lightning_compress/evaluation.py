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


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a causal language model: a Hugging Face ``*ForCausalLM`` among its modules, or
    a module that says so with a ``causal_lm = True`` attribute (:class:`~lightning_compress.examples.causal_lm.
    CausalLMModule`)."""
    return any(type(m).__name__.endswith("ForCausalLM") or getattr(m, "causal_lm", False) is True
               for m in model.modules())  # fmt: skip


def next_token_targets(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A causal LM's predictions and what they predict: position ``t`` of ``logits`` scores token ``t + 1``.

    Shapes: ``(B, T, V)`` logits and ``(B, T)`` labels (the input ids, Hugging Face's ``labels`` convention, with
    ``IGNORE_INDEX`` where no loss is wanted) -> ``logits[:, :-1]`` ``(B, T-1, V)`` and ``labels[:, 1:]`` ``(B, T-1)``
    with ``IGNORE_INDEX`` wherever ``mask`` (an attention mask, ``(B, T)``) marks padding.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected (B, T, V) logits and (B, T) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(~mask[:, 1:].to(device=targets.device, dtype=torch.bool), IGNORE_INDEX)
    return logits[:, :-1], targets


def next_token_loss(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A causal LM's mean next-token cross-entropy over its real targets (float32), with the shifted logits and
    targets of :func:`next_token_targets` it was computed from: ``(loss, (B, T-1, V), (B, T-1))``."""
    logits, targets = next_token_targets(logits, labels, mask)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return loss, logits, targets


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
            logits, targets = next_token_targets(_logits(call_model(model, inputs)), ids.to(device), token_mask(inputs))
            metric.update(logits.float().cpu(), targets.cpu())
    if int(metric.count) == 0:
        raise ValueError("batches hold no token to predict (each sequence needs at least two real tokens)")
    return float(metric.compute())
