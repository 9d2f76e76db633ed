"""GPTQ over a whole model: Hessians gathered by hooks, layers solved true-sequentially, block by block.

The walk is the calibration engine's (:func:`~lightning_compress.calibration.engine.sequential_stages`): each
block's layers are calibrated on inputs that already went through the quantized blocks before it, and within a block
group by group in execution order (q/k/v, then the attention output, then the MLP), as Frantar et al. do with
``true_sequential``. Layers outside the stack (a pooler, a classifier head) and models without a stack are
calibrated through the whole model, with everything before them already quantized.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.calibration.capture import (
    eval_mode,
)
from lightning_compress.calibration.dataflow import dataflow
from lightning_compress.calibration.engine import Pass, accumulate_inputs, sequential_stages
from lightning_compress.calibration.progress import Progress
from lightning_compress.calibration.threads import gptq_threads
from lightning_compress.functional.gptq import GPTQOptions, GPTQResult, gptq_quantize, hessian_update
from lightning_compress.nn.distributed import all_reduce_, broadcast_object, is_distributed, world_size

log = logging.getLogger(__name__)

GPTQ_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

PRUNED_MIN_SPARSITY = 0.05
"""A layer with at least this fraction of exact zeros counts as pruned, and GPTQ keeps its zeros. Dense weights
hold a few zeros by chance (SmolLM2's, dequantized from Q4_1: 0.03%), and holding those costs accuracy for nothing
(SmolLM2 W4 GPTQ: perplexity 64.3 held, 62.5 free); pruning leaves 10% and more."""


def pruned_zeros(weight: Tensor) -> Tensor | None:
    """Where ``weight`` (any shape) is exactly zero, if it counts as pruned (:data:`PRUNED_MIN_SPARSITY`); else
    None."""
    zeros = weight == 0
    return zeros if zeros.sum() >= PRUNED_MIN_SPARSITY * zeros.numel() else None


def is_gptq_layer(module: nn.Module) -> bool:
    """Whether GPTQ can quantize ``module``: a Linear, or a Conv2d with ``groups=1`` and numeric padding."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and not isinstance(module.padding, str) and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight as GPTQ sees it: ``(out, in)``, a conv's flattened to ``(out, in · kh · kw)``."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The rows ``X`` (tokens, in) with ``output = X Wᵀ`` for :func:`weight_matrix`: a conv's input is unfolded."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, in·kh·kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _collect_hessians(layers: Mapping[str, nn.Module], passes: Sequence[Pass], dtype: torch.dtype) -> dict[str, Tensor]:
    """``H = 2 XᵀX`` of every layer over ``passes`` (real tokens only), all-reduced (sum) across ranks."""
    hessians = {n: torch.zeros(weight_matrix(m).shape[1], weight_matrix(m).shape[1], dtype=dtype,
                                device=m.weight.device) for n, m in layers.items()}  # fmt: skip
    accumulate_inputs(layers, passes, lambda name, module, x: hessian_update(hessians[name], layer_inputs(module, x)))
    for h in hessians.values():
        all_reduce_(h, "sum")
    return hessians


def solved_without_input(name: str, hessian: Tensor, method: str) -> Tensor:
    """``hessian``, or the identity (with a warning: the method falls back to its data-free form) for a layer that
    saw no calibration input."""
    if hessian.diagonal().sum() == 0:
        warnings.warn(
            f"{method}: layer {name!r} saw no calibration input; solved as if its inputs were white "
            "(GPTQ: round to nearest, SparseGPT: by magnitude)",
            stacklevel=4,
        )
        return torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return hessian


LayerSolver = Callable[[str, nn.Module, Tensor], Any]
"""``solve(name, layer, H)``: a layer's result from its Hessian (the layer is not changed; ``result.weight``, or
``result[0].weight`` for a pair, is its new weight)."""


def _new_weight(result: Any) -> Tensor:
    return result.weight if hasattr(result, "weight") else result[0].weight


def _to_cpu(result: Any) -> Any:
    if isinstance(result, Tensor):
        return result.cpu()
    if isinstance(result, tuple):
        items = [_to_cpu(r) for r in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    return result


def hessian_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    solve: LayerSolver,
    true_sequential: bool = True,
    hessian_dtype: torch.dtype = torch.float64,
    label: str = "GPTQ",
    finish: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run a Hessian-based solver (GPTQ, SparseGPT) over ``layers`` of ``model``, block by block (true-sequential).

    On the engine's walk (:func:`~lightning_compress.calibration.engine.sequential_stages`), within each block group
    by group in execution order (or the whole block at once without ``true_sequential``): ``H = 2 XᵀX`` of each
    layer over the real tokens (all-reduced across ranks; Linears reading the very same input, q/k/v, share one,
    computed once), then ``solve(name, layer, H)`` and the layer's weight set to the result's. Under DDP the layers
    of a group are shared out among the ranks (layer ``k`` of the group to rank ``k mod world size``), each solved
    by its rank alone and its result broadcast, so every rank holds the same results. Call under
    ``torch.no_grad()``.

    Args:
        finish: called with each block's ``{name: solve(...)}`` once the block's outputs are taken (the caller may
            replace those layers now); its results are then not kept, so memory does not grow with depth.

    Returns:
        ``{name: solve(...)}`` (empty with ``finish``: every result went to it).
    """
    results: dict[str, Any] = {}
    rank, world = (torch.distributed.get_rank(), world_size()) if is_distributed() else (0, 1)

    def done(names: list[str]) -> None:
        if finish is not None:
            finish({n: results.pop(n) for n in names})

    with eval_mode(model), torch.no_grad(), Progress(len(layers), f"{label} layers") as bar:
        for stage in sequential_stages(model, layers, batches, done):
            groups = dataflow(stage.passes[0].run, stage.layers).groups
            owner = {n: g[0] if all(type(stage.layers[m]) is nn.Linear for m in g) else n for g in groups for n in g}
            for names in groups if true_sequential else [[n for g in groups for n in g]]:
                shared = {o: stage.layers[o] for o in dict.fromkeys(owner[n] for n in names)}
                hessians = _collect_hessians(shared, stage.passes, hessian_dtype)
                mine = {
                    n: solve(n, stage.layers[n], hessians[owner[n]]) for k, n in enumerate(names) if k % world == rank
                }
                for k, name in enumerate(names):
                    result = mine.get(name)
                    if world > 1:
                        result = broadcast_object(None if result is None else _to_cpu(result), src=k % world)
                    layer = stage.layers[name]
                    layer.weight.copy_(_new_weight(result).reshape(layer.weight.shape).to(layer.weight))
                    results[name] = result
                    bar.step(name)
    log.info("%s: %d layers solved", label, len(layers))
    return results


def gptq_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    options: GPTQOptions | Mapping[str, GPTQOptions],
    true_sequential: bool = True,
    hessian_dtype: torch.dtype = torch.float64,
    finish: Callable[[dict[str, GPTQResult], dict[str, Tensor | None]], None] | None = None,
) -> dict[str, GPTQResult]:
    """Quantize ``layers`` of ``model`` in place with GPTQ (Frantar et al. 2023) on calibration ``batches``.

    Args:
        model: the model; its ``forward`` takes each batch (Tensor, tuple or dict, see
            :func:`~lightning_compress.calibration.batches.call_args`).
        layers: ``{qualified name: layer}``, Linear or Conv2d (see :func:`is_gptq_layer`).
        batches: calibration inputs, held in memory for the whole run.
        options: the per-layer solve (:class:`~lightning_compress.functional.gptq.GPTQOptions`: bits, group_size,
            ...), the same for every layer, or ``{name: GPTQOptions}`` per layer (a compression plan); a
            ``group_size`` must divide its layer's input width.
        true_sequential: calibrate each group of layers on inputs from already-quantized predecessors; False
            gathers a whole block's Hessians in one pass (faster, slightly less accurate).
        hessian_dtype: accumulation dtype of the Hessian sums (float64, or float32 at half the memory and time).
        finish: called with each block's ``{name: GPTQResult}`` and ``{name: pruned}`` (where the weight was zero
            before, for a layer that counts as pruned, :func:`pruned_zeros`; else None) once the block's outputs
            are taken, as for :func:`hessian_model`; its results are then not returned.

    Returns:
        ``{name: GPTQResult}`` in the original column order (empty with ``finish``); each layer's weight now equals
        ``result.weight``; in a pruned layer zero wherever it was zero before, the pruned weights' errors
        compensated by the kept ones (``keep`` of :func:`~lightning_compress.functional.gptq.gptq_quantize`).
    """

    def solve(name: str, module: nn.Module, hessian: Tensor) -> tuple[GPTQResult, Tensor | None]:
        weight = weight_matrix(module)
        zeros = pruned_zeros(weight)  # a pruned weight stays exactly 0 (SparseGPT, Wanda, magnitude before GPTQ)
        solve_options = options[name] if isinstance(options, Mapping) else options
        result = gptq_quantize(weight, solved_without_input(name, hessian, "GPTQ"), solve_options,
                               threads=gptq_threads, keep=None if zeros is None else ~zeros)  # fmt: skip
        return result, zeros

    def split(done: dict[str, tuple[GPTQResult, Tensor | None]]) -> None:
        finish({n: r for n, (r, _) in done.items()}, {n: z for n, (_, z) in done.items()})

    results = hessian_model(model, layers, batches, solve, true_sequential, hessian_dtype, "GPTQ",
                            None if finish is None else split)  # fmt: skip
    return {n: r for n, (r, _) in results.items()}
