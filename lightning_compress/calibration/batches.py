"""Batches: what a dataloader yields, what a model's ``forward`` takes, and the tokens that count.

A *training batch* is what a LightningModule's dataloader yields: ``(x, y, ...)``, a dict with its labels under one
of :data:`LABEL_KEYS`, or bare inputs; :func:`split_batch` is the one rule that takes it apart. *Model inputs* are
what ``forward`` takes: a Tensor (one positional input), a tuple or list (positional inputs) or a Mapping such as a
tokenizer's output (keyword inputs); :func:`call_args` turns them into ``(args, kwargs)``. Nothing here stores
activations beyond what a caller asks for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# Keys a training batch dict carries besides the model's inputs.
LABEL_KEYS = frozenset({"labels", "label", "targets", "target", "y"})

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(model inputs, labels)`` of a training batch; labels are None when the batch carries none.

    ``(x, y, ...)`` gives ``(x, y)`` (``(x,)`` gives ``(x, None)``); a dict gives itself without its
    :data:`LABEL_KEYS` and the first label found; anything else is model inputs alone.
    """
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, None if key is None else batch[key]
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


def call_args(batch: Any) -> Inputs:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from one batch of model inputs.

    A Tensor is one positional input, a tuple or list the positional inputs, a Mapping the keyword inputs.

    Raises:
        TypeError: any other type (naming it).
    """
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(
        f"batches must yield a Tensor, a tuple / list (positional inputs) or a dict (keyword inputs), "
        f"got {type(batch).__name__}"
    )


def describe(inputs: Any) -> str:
    """A short description of model inputs for errors: ``Tensor(4, 16)``, ``tuple of 3``, ``dict(input_ids)``."""
    if isinstance(inputs, Tensor):
        return f"Tensor{tuple(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return f"dict({', '.join(map(str, inputs))})"
    if isinstance(inputs, (tuple, list)):
        return f"{type(inputs).__name__} of {len(inputs)}"
    return type(inputs).__name__


def head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a calibration batch (:func:`rows` ``0 .. n``)."""
    return rows(batch, 0, n)


def rows(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start .. stop - 1`` of a batch (a Tensor, tuple / list or dict): every Tensor sharing the first
    Tensor's leading size is cut, anything else is kept as it is."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    tensors = [t for t in items if isinstance(t, Tensor)]
    size = tensors[0].shape[0] if tensors and tensors[0].dim() else None

    def cut(t: Any) -> Any:
        return t[start:stop] if isinstance(t, Tensor) and t.dim() and t.shape[0] == size else t

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every Tensor inside (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj) if not hasattr(obj, "_fields") else obj
    return obj


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(*args, **kwargs)`` for one calibration batch, moved to the model's device."""
    args, kwargs = call_args(to_device(batch, model_device(model)))
    return model(*args, **kwargs)


def token_mask(batch: Any) -> Tensor | None:
    """The ``(B, T)`` bool mask of real (not padding) tokens of a tokenizer-style batch, or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` (or a Hugging Face model inside it) takes: its config's
    ``max_position_embeddings``; None when it declares none."""
    for module in model.modules():
        length = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        if isinstance(length, int):
            return length
    return None


def check_tokens(model: nn.Module, batches: Sequence[Any]) -> None:
    """Raise ValueError when tokenizer-style calibration ``batches`` (dicts with ``input_ids``) hold no real token, or
    hold sequences longer than the model's context (:func:`context_length`); other batches pass."""
    tokenized = [b for b in batches if isinstance(b, Mapping) and isinstance(b.get("input_ids"), Tensor)]
    if not tokenized:
        return
    limit = context_length(model)
    longest = max(int(b["input_ids"].shape[-1]) if b["input_ids"].dim() else 0 for b in tokenized)
    if limit is not None and longest > limit:
        raise ValueError(
            f"calibration batches hold sequences of {longest} tokens, beyond {type(model).__name__}'s context of "
            f"{limit} (config.max_position_embeddings); allowed: sequences of at most {limit} tokens"
        )
    if not any(token_count(b) for b in tokenized):
        raise ValueError(
            "calibration batches hold no real token (every input_ids is empty or every attention_mask is 0); "
            "allowed: batches with at least one token whose attention_mask is 1"
        )


def token_count(batch: Any) -> int:
    """The real tokens (rows a Linear sees) in one batch of model inputs: its attention mask's ones; else every id
    of an integer first Tensor, or the rows ``numel / features`` of a float one."""
    mask = token_mask(batch)
    if mask is not None:
        return int(mask.sum())
    tensors = [t for t in (batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list))
                           else [batch]) if isinstance(t, Tensor)]  # fmt: skip
    if not tensors:
        return 0
    t = tensors[0]
    return t.numel() if not t.is_floating_point() or t.dim() < 2 else t.numel() // t.shape[-1]


def real_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of a layer input ``x`` (B, T, C) at the real tokens of ``mask`` (B, T) as ``(n, C)``; ``x``
    unchanged when there is no mask or the shapes do not line up (e.g. a pooler's ``(B, C)`` input)."""
    if mask is None or x.dim() != 3 or x.shape[:2] != mask.shape:
        return x
    return x[mask.to(x.device)]


def float_tensors(out: Any) -> list[Tensor]:
    """Every floating-point Tensor in a model output (Tensor, tuple, list, dict or ``ModelOutput``), in order."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in float_tensors(item)]
    return []


def first_tensor(out: Any) -> Tensor:
    """The main output of a layer: ``out`` itself, or the first Tensor of a tuple / dict (HF layers return tuples)."""
    tensors = float_tensors(out)
    if not tensors:
        raise TypeError(f"expected a Tensor output, got {type(out).__name__}")
    return tensors[0]


def relative_error(reference: Any, other: Any) -> float:
    """``max_i ||a_i - b_i|| / ||a_i||`` over the float Tensors of two model outputs of the same structure."""
    pairs = zip(float_tensors(reference), float_tensors(other), strict=True)
    return max(float((b.float() - a.float()).norm() / a.float().norm().clamp_min(1e-30)) for a, b in pairs)
