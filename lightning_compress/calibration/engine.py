"""The block-by-block calibration engine that every one-shot algorithm runs on (GPTQ today; SparseGPT, Wanda, AWQ).

:func:`sequential_stages` walks a model the way Frantar et al. calibrate GPTQ: for a transformer (a repeated
``nn.ModuleList`` of blocks, :func:`~lightning_compress.calibration.capture.find_blocks`) the inputs of block 0 are
captured once, each block's selected layers are handed to the algorithm with passes that replay that block on its
current inputs, and after the algorithm changed them the block runs once more to give the next block its inputs (so
each block sees what the already-compressed blocks before it produce). Only one block's activations are held beyond
the calibration batches. Layers outside the stack, and models without one, come last with whole-model passes.

Under :func:`streaming` the same walk runs on a model whose blocks live on disk (the ``meta`` device): a
:class:`BlockStream` captures block 0's inputs (or those of the block a resumed run continues at), loads each block's
weights before its stage and writes and frees the block once its outputs are taken
(:mod:`lightning_compress.streaming`). Every algorithm on this walk streams without knowing it.

:func:`accumulate_inputs` runs passes with a forward pre-hook on each layer, handing every input (real tokens only)
to a running statistic, and stops a pass once every layer has seen its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple, Protocol

from torch import Tensor, nn

from lightning_compress.calibration.batches import Inputs, call_model, first_tensor, real_tokens, token_mask
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


class BlockStream(Protocol):
    """Where the blocks of a streamed model come from and where finished ones go (see :func:`streaming`)."""

    def capture(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, batches: Sequence[Any]) -> list[Inputs]:
        """The inputs of the first block to calibrate, one ``(args, kwargs)`` per batch (block 0's, or on resume
        those of the block after the last finished one); :meth:`start` tells which block that is."""

    def start(self) -> int:
        """The index of the first block still to calibrate (0 unless a run is resumed)."""

    def check(self, model: nn.Module, batch: Any) -> None:
        """Run ``model`` on one batch as far as it can be run before the walk (up to its first block)."""

    def load(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s weights into ``block`` (read from disk)."""

    def release(self, index: int, block: nn.Module, layers: Mapping[str, nn.Module], inputs: list[Inputs]) -> None:
        """Block ``index`` is finished (``layers``: its calibrated layers as they were selected; ``inputs``: the next
        block's inputs): write it, free its weights, record progress."""


_STREAM: ContextVar[BlockStream | None] = ContextVar("block_stream", default=None)


@contextmanager
def streaming(stream: BlockStream) -> Iterator[None]:
    """Within this context every :func:`sequential_stages` walk takes its blocks from ``stream``."""
    token = _STREAM.set(stream)
    try:
        yield
    finally:
        _STREAM.reset(token)


def active_stream() -> BlockStream | None:
    """The :class:`BlockStream` of the enclosing :func:`streaming` context, or None."""
    return _STREAM.get()


def sequential_stages(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    done: Callable[[list[str]], None] | None = None,
) -> Iterator[Stage]:
    """Yield one :class:`Stage` per block holding selected layers, in order, then one for the rest (if any).

    The consumer changes a stage's layers in place before asking for the next stage; the block is then run on its
    current inputs to make the next block's, and ``done(names)`` is called with the stage's layer names (the
    consumer may now replace those layers: the next block's inputs are taken). Call under ``torch.no_grad()`` and
    eval mode.

    Args:
        model: the model; its ``forward`` takes each batch (model inputs).
        layers: ``{qualified name: layer}`` to calibrate.
        batches: calibration model inputs, held in memory for the whole walk.
        done: called after each stage's block has produced the next block's inputs (and after the last stage).

    Raises:
        ValueError: under :func:`streaming`, a selected layer outside the block stack (it would need the whole model
            in memory).
    """
    rest = dict(layers)
    masks = [token_mask(b) for b in batches]
    found = find_blocks(model, layers)
    stream = active_stream()
    if stream is not None:
        outside = [n for n in layers if found is None or not n.startswith(f"{found[0]}.")]
        if outside:
            raise ValueError(
                f"streamed calibration reaches the layers of the repeated block stack only; {outside[:5]} lie outside "
                "it (they would need the whole model in memory); allowed: ignore them, or calibrate in memory"
            )
    if found is not None:
        prefix, blocks = found
        inputs = stream.capture(model, prefix, blocks, batches) if stream else capture_inputs(model, blocks[0], batches)
        start = stream.start() if stream else 0
        for i, block in enumerate(blocks):
            inner = {n: rest.pop(n) for n in list(rest) if n.startswith(f"{prefix}.{i}.")}
            if i < start:  # finished by the run this one resumes
                continue
            if stream:
                stream.load(i, block)
            if inner:
                yield Stage(
                    inner, [Pass(lambda b=block, a=a: b(*a[0], **a[1]), m) for a, m in zip(inputs, masks, strict=True)]
                )
            for j, (args, kwargs) in enumerate(inputs):  # in place: one block's activations at a time
                inputs[j] = replace_hidden((args, kwargs), first_tensor(block(*args, **kwargs)))
            if done and inner:
                done(list(inner))
            if stream:
                stream.release(i, block, inner, inputs)
        del inputs
    if rest:
        yield Stage(rest, [Pass(lambda b=b: call_model(model, b), m) for b, m in zip(batches, masks, strict=True)])
        if done:
            done(list(rest))


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
