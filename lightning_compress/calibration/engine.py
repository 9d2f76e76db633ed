"""The block-by-block calibration engine that every one-shot algorithm runs on (GPTQ today; SparseGPT, Wanda, AWQ).

:func:`sequential_stages` walks a model the way Frantar et al. calibrate GPTQ: for a transformer (a repeated
``nn.ModuleList`` of blocks, :func:`~lightning_compress.calibration.capture.find_blocks`) the inputs of block 0 are
captured once, each block's selected layers are handed to the algorithm with passes that replay that block on its
current inputs, and after the algorithm changed them the block runs once more to give the next block its inputs (so
each block sees what the already-compressed blocks before it produce). Only one block's activations are held beyond
the calibration batches. Layers outside the stack, and models without one, come last with whole-model passes.

:func:`accumulate_inputs` runs passes with a forward pre-hook on each layer, handing every input (real tokens only)
to a running statistic, and stops a pass once every layer has seen its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from lightning_compress.calibration.batches import call_model, first_tensor, real_tokens, token_mask
from lightning_compress.calibration.capture import (
    StopForward,
    capture_inputs,
    find_blocks,
    hooks,
    replace_hidden,
    run_until,
)


class Pass(NamedTuple):
    """One forward over one calibration batch (``run()``), and that batch's real-token mask (None: every row)."""

    run: Callable[[], Any]
    mask: Tensor | None


class Stage(NamedTuple):
    """Layers to calibrate together (one block's, or those outside the stack) and the passes that reach them."""

    layers: dict[str, nn.Module]
    passes: list[Pass]


def sequential_stages(model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[Any]) -> Iterator[Stage]:
    """Yield one :class:`Stage` per block holding selected layers, in order, then one for the rest (if any).

    The consumer changes a stage's layers in place before asking for the next stage; the block is then run on its
    current inputs to make the next block's. Call under ``torch.no_grad()`` and eval mode.

    Args:
        model: the model; its ``forward`` takes each batch (model inputs).
        layers: ``{qualified name: layer}`` to calibrate.
        batches: calibration model inputs, held in memory for the whole walk.
    """
    rest = dict(layers)
    masks = [token_mask(b) for b in batches]
    found = find_blocks(model, layers)
    if found is not None:
        prefix, blocks = found
        inputs = capture_inputs(model, blocks[0], batches)
        for i, block in enumerate(blocks):
            inner = {n: rest.pop(n) for n in list(rest) if n.startswith(f"{prefix}.{i}.")}
            if inner:
                yield Stage(
                    inner, [Pass(lambda b=block, a=a: b(*a[0], **a[1]), m) for a, m in zip(inputs, masks, strict=True)]
                )
            for j, (args, kwargs) in enumerate(inputs):  # in place: one block's activations at a time
                inputs[j] = replace_hidden((args, kwargs), first_tensor(block(*args, **kwargs)))
        del inputs
    if rest:
        yield Stage(rest, [Pass(lambda b=b: call_model(model, b), m) for b, m in zip(batches, masks, strict=True)])


def accumulate_inputs(
    layers: Mapping[str, nn.Module],
    passes: Sequence[Pass],
    update: Callable[[str, nn.Module, Tensor], None],
    stop_early: bool = True,
) -> None:
    """Run ``passes`` with ``update(name, layer, x)`` called on every layer's input ``x`` (real tokens of the pass's
    mask only: ``(n, C)`` for a ``(B, T, C)`` input).

    With ``stop_early`` a pass ends as soon as every layer has seen its input (the rest of the forward is not needed);
    otherwise each pass runs to the end. Every call of a layer before that point counts.
    """
    current: list[Tensor | None] = [None]
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            update(name, module, real_tokens(args[0].detach(), current[0]))
            seen.add(name)
            if stop_early and len(seen) == len(layers):  # every layer has its input: the rest is not needed
                raise StopForward

        return hook

    with hooks([m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]):
        for p in passes:
            current[0] = p.mask
            seen.clear()
            run_until(p.run)
