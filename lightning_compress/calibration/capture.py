"""Running parts of a model on calibration batches: the block stack, block inputs, stopping a forward early."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.calibration.batches import Inputs, call_model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout, BatchNorm frozen) and restore each module's mode afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def hooks(handles: Sequence[Any]) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def find_blocks(model: nn.Module, layers: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """The repeated stack of a transformer (e.g. ``encoder.layer``, ``model.layers``): the ``nn.ModuleList`` of
    same-class modules holding the most of ``layers`` (qualified names), or None when no such stack exists."""
    names = list(layers)
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or len({type(m) for m in module}) > 1:
            continue
        count = sum(n.startswith(f"{name}.") for n in names)
        if count > best_count:
            best, best_count = (name, module), count
    return best


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured (see :func:`run_until`)."""


def run_until(run: Callable[[], Any]) -> None:
    """Call ``run()``; a :class:`StopForward` raised inside ends it quietly."""
    with suppress(StopForward):
        run()


# Keyword inputs of a block that hold a key/value cache; replaying a block with them would grow the cache.
CACHE_KWARGS = frozenset({"past_key_value", "past_key_values", "layer_past", "cache"})


def capture_inputs(model: nn.Module, module: nn.Module, batches: Sequence[Any]) -> list[Inputs]:
    """The ``(args, kwargs)`` ``module`` receives for each calibration batch; the forward stops right there.

    Key/value caches among the keyword inputs (:data:`CACHE_KWARGS`) are dropped and ``use_cache`` set to False, so
    the block can be replayed any number of times.

    Raises:
        RuntimeError: ``module`` is not called for some batch.
    """
    stored: list[Inputs] = []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = {k: None if k in CACHE_KWARGS else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        stored.append((args, kwargs))
        raise StopForward

    with hooks([module.register_forward_pre_hook(hook, with_kwargs=True)]), torch.no_grad():
        for batch in batches:
            try:
                call_model(model, batch)
            except StopForward:
                continue
            raise RuntimeError(f"{type(module).__name__} was not called by the model's forward on a calibration batch")
    return stored


def replace_hidden(inputs: Inputs, hidden: Tensor) -> Inputs:
    """``inputs`` of a block with its hidden states (first positional, or ``hidden_states=``) replaced."""
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise ValueError(
        "cannot find the hidden states among the block's inputs (no positional argument, no hidden_states)"
    )
