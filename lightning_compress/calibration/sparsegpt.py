"""SparseGPT over a whole model: GPTQ's Hessians and block-by-block walk, each layer pruned (and optionally
quantized) by :func:`~lightning_compress.functional.sparsegpt.sparsegpt_prune`.

As in Frantar & Alistarh's implementation, blocks are pruned in order, each calibrated on the outputs of the already
pruned blocks before it, and within a block group by group in execution order (true-sequential) by default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.calibration.gptq import hessian_model, solved_without_input
from lightning_compress.calibration.threads import gptq_threads
from lightning_compress.functional.gptq import GPTQOptions
from lightning_compress.functional.sparsegpt import SparseGPTResult, sparsegpt_prune


def sparsegpt_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    options: GPTQOptions | None = None,
    quantize: bool = False,
    true_sequential: bool = True,
    hessian_dtype: torch.dtype = torch.float64,
    finish: Callable[[dict[str, SparseGPTResult]], None] | None = None,
) -> dict[str, SparseGPTResult]:
    """Prune ``layers`` (Linears) of ``model`` in place with SparseGPT on calibration ``batches``.

    Args:
        model: the model; its ``forward`` takes each batch.
        layers: ``{qualified name: nn.Linear}``.
        batches: calibration model inputs, held in memory for the whole run.
        sparsity, nm, options, quantize: as for :func:`~lightning_compress.functional.sparsegpt.sparsegpt_prune`
            (the same for every layer).
        true_sequential, hessian_dtype, finish: as for :func:`~lightning_compress.calibration.gptq.gptq_model`
            (``finish`` receives each block's ``{name: SparseGPTResult}``).

    Returns:
        ``{name: SparseGPTResult}`` (empty with ``finish``); each layer's weight now equals ``result.weight`` (zero
        where the mask is False).
    """
    options = options or GPTQOptions()

    def solve(name: str, module: nn.Module, hessian: Tensor) -> SparseGPTResult:
        hessian = solved_without_input(name, hessian, "SparseGPT")
        return sparsegpt_prune(module.weight, hessian, sparsity, nm, options, quantize, threads=gptq_threads)

    return hessian_model(model, layers, batches, solve, true_sequential, hessian_dtype, "SparseGPT", finish)
