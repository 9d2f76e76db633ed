"""Wanda over a whole model: input norms gathered by hooks, block by block on the engine's walk.

As in Sun et al.'s implementation, one pass over a block's inputs gathers ``Σ_t x_tj²`` for every selected Linear of
the block, the block's layers are pruned (:func:`~lightning_compress.functional.wanda.wanda_mask`), and the block then
runs again to give the next block its inputs: each block is scored on what the already-pruned blocks before it
produce (:func:`~lightning_compress.calibration.engine.sequential_stages`). Only real tokens count (padding is
masked out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.calibration.capture import eval_mode
from lightning_compress.calibration.engine import accumulate_inputs, sequential_stages
from lightning_compress.calibration.progress import Progress
from lightning_compress.functional.wanda import wanda_mask
from lightning_compress.nn.distributed import all_reduce_, broadcast_

log = logging.getLogger(__name__)


def input_sq_norms(layers: Mapping[str, nn.Module], passes: Sequence[Any]) -> dict[str, Tensor]:
    """``Σ_t x_tj²`` ``(in,)`` float64 of every Linear in ``layers`` over the real tokens of ``passes``, all-reduced
    (sum) across ranks."""
    norms = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for n, m in layers.items()}

    def update(name: str, module: nn.Module, x: Tensor) -> None:
        norms[name].add_(x.reshape(-1, x.shape[-1]).double().square().sum(0))

    accumulate_inputs(layers, passes, update)
    for t in norms.values():
        all_reduce_(t, "sum")
    return norms


def wanda_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    finish: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """Prune ``layers`` (Linears) of ``model`` in place with Wanda on calibration ``batches``.

    Args:
        model: the model; its ``forward`` takes each batch.
        layers: ``{qualified name: nn.Linear}``.
        batches: calibration model inputs, held in memory for the whole run.
        sparsity: the fraction of each output row removed (unstructured).
        nm: ``(n, m)`` for N:M sparsity instead (every layer's input width divisible by ``m``).
        finish: called with each block's ``{name: mask}`` once the block's outputs are taken; they are then not
            returned (memory does not grow with depth).

    Returns:
        ``{name: bool keep-mask (out, in)}`` (empty with ``finish``); each weight is now zero exactly where its mask
        is False.
    """
    masks: dict[str, Tensor] = {}

    def done(names: list[str]) -> None:
        if finish is not None:
            finish({n: masks.pop(n) for n in names})

    with eval_mode(model), torch.no_grad(), Progress(len(layers), "Wanda layers") as bar:
        for stage in sequential_stages(model, layers, batches, done):
            norms = input_sq_norms(stage.layers, stage.passes)
            for name, layer in stage.layers.items():
                mask = wanda_mask(layer.weight, norms[name], sparsity, nm)
                broadcast_(mask)
                layer.weight.masked_fill_(~mask, 0.0)
                masks[name] = mask
                bar.step(name)
    log.info("Wanda: %d layers pruned", len(layers))
    return masks
