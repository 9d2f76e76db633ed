"""AWQ over a whole model (Lin et al. 2024): per block, per group of Linears sharing an input, search the scales,
fold them, then search each weight's clipping; block by block on the calibration engine.

The walk is :func:`~lightning_compress.calibration.engine.sequential_stages`: each block is calibrated on the outputs
of the blocks before it, already scaled and clipped. Within a block:

1. Groups and producers: the Linears reading one tensor (q/k/v; gate/up) and the norm or Linear whose output it is
   (:func:`~lightning_compress.calibration.dataflow.dataflow`, as for SmoothQuant). A group whose input is a
   per-channel multiple of a Linear's output without being that output (``down_proj`` reads ``act(gate) · up``) gets
   that Linear as producer when folding a test scale into it leaves the block's output unchanged. Groups with no
   producer are not scaled.
2. Scale search: for ``α`` on a grid in ``[0, 1)``, ``s = mean|X|^α`` (normalised), the group's weights are set to
   ``Q(W diag(s)) diag(s)⁻¹`` and the smallest module holding the whole group (the attention for q/k/v, the MLP for
   gate/up, the layer itself otherwise) is run on its captured inputs; the ``α`` with the least mean squared output
   error against the float module wins, and ``s`` is folded exactly as SmoothQuant folds
   (:func:`~lightning_compress.calibration.smoothquant.fold_group`).
3. Clipping search (optional): each scaled weight is clamped to the per-group range that minimises its output error
   (:func:`~lightning_compress.functional.awq.clip_ratios`).

The weights stay float (scaled and clipped): round them to nearest, or run GPTQ on them, afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_compress.calibration.batches import first_tensor, relative_error, token_count
from lightning_compress.calibration.capture import StopForward, eval_mode, hooks, run_until
from lightning_compress.calibration.dataflow import dataflow
from lightning_compress.calibration.engine import Pass, accumulate_inputs, sequential_stages
from lightning_compress.calibration.progress import Progress
from lightning_compress.calibration.smoothquant import FOLD_TOLERANCE, SmoothGroup, fold_group, is_foldable_norm
from lightning_compress.functional.awq import awq_factors, clip_ratios, clip_weight, scaled_fake_quant
from lightning_compress.nn.distributed import all_reduce_, broadcast_, world_size

log = logging.getLogger(__name__)


class AWQGroup(NamedTuple):
    """What AWQ did to one group of Linears: its factors ``s`` (folded into ``producer``; None when not scaled) and
    the chosen ``alpha``."""

    layers: list[str]
    producer: str | None
    s: Tensor | None
    alpha: float | None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _common_prefix(names: Sequence[str]) -> str:
    """The longest dotted prefix that every name in ``names`` lies strictly under (``""``: the model itself)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _search_passes(passes: Sequence[Pass], tokens: Sequence[int], max_tokens: int) -> list[Pass]:
    """The first passes (whose batches hold ``tokens`` real tokens each) holding at most ``max_tokens`` in all, at
    least one."""
    chosen, total = [], 0
    for p, n in zip(passes, tokens, strict=True):
        if chosen and total + n > max_tokens:
            break
        chosen.append(p)
        total += n
    return chosen


def _capture_calls(module: nn.Module, passes: Sequence[Pass]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The ``(args, kwargs)`` of ``module``'s first call in each pass (the pass stops there)."""
    calls = []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, kwargs))
        raise StopForward

    with hooks([module.register_forward_pre_hook(hook, with_kwargs=True)]):
        for p in passes:
            run_until(p.run)
    return calls


def _holder(block: nn.Module, prefix: str, names: Sequence[str]) -> nn.Module:
    """The smallest submodule of ``block`` (named ``prefix``) holding every layer in ``names``."""
    parts = [n[len(prefix) + 1 :].split(".") if prefix else n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return block.get_submodule(".".join(common)) if common else block


def _linear_producer(stage_layers: Mapping[str, nn.Module], block: nn.Module, prefix: str, group: list[str],
                     passes: Sequence[Pass]) -> str | None:  # fmt: skip
    """A Linear of the block whose output channels scale the group's input channel by channel (e.g. ``up_proj`` for
    ``down_proj``): folding a random test scale into it and its inverse into the group leaves the block's output
    unchanged. None when there is none."""
    width = stage_layers[group[0]].in_features
    test = torch.rand(width, generator=torch.Generator().manual_seed(0)) + 0.5
    reference = first_tensor(passes[0].run())
    for name, module in block.named_modules():
        full = _join(prefix, name)
        if not isinstance(module, nn.Linear) or module.out_features != width or full in group:
            continue
        saved = {n: stage_layers[n].weight.detach().clone() for n in group}
        saved[full] = module.weight.detach().clone()
        bias = None if module.bias is None else module.bias.detach().clone()
        fold_group(block, {**stage_layers}, SmoothGroup(group, name), test.to(module.weight.device))
        ok = relative_error(reference, first_tensor(passes[0].run())) <= FOLD_TOLERANCE
        for n in group:
            stage_layers[n].weight.copy_(saved[n])
        module.weight.copy_(saved[full])
        if bias is not None:
            module.bias.copy_(bias)
        if ok:
            return full
    return None


def _mean_abs_inputs(layer_name: str, layer: nn.Module, passes: Sequence[Pass]) -> Tensor:
    """``mean_t |X_tj|`` ``(in,)`` of a layer's inputs over the real tokens of ``passes`` (all-reduced)."""
    # the sums of |x| per channel, then the token count, in one vector: one all-reduce
    sums = torch.zeros(layer.in_features + 1, dtype=torch.float64, device=layer.weight.device)

    def update(_: str, __: nn.Module, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        sums[:-1].add_(rows.abs().double().sum(0))
        sums[-1] += rows.shape[0]

    accumulate_inputs({layer_name: layer}, passes, update)
    all_reduce_(sums, "sum")
    return (sums[:-1] / sums[-1].clamp(min=1)).float()


def awq_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    grid: int = 20,
    clip: bool = True,
    max_search_tokens: int = 4096,
    finish: Callable[[list[str]], None] | None = None,
) -> list[AWQGroup]:
    """Scale (and clip) ``layers`` (Linears) of ``model`` in place with AWQ for the grid ``bits`` / ``group_size`` /
    ``symmetric``; the weights stay float.

    Args:
        model: the model; its ``forward`` takes each batch.
        layers: ``{qualified name: nn.Linear}``.
        batches: calibration model inputs, held in memory for the whole run.
        bits, group_size, symmetric: the grid the weights will be rounded onto afterwards.
        grid: ``α`` steps of the scale search (``α = i / grid``, ``i < grid``).
        clip: run the clipping search after the scales.
        max_search_tokens: real tokens (whole batches, at least one) the searches run on, in all: under DDP each rank
            searches on its first ``max_search_tokens / world size`` and the errors are summed across ranks, so with
            interleaved shards the ranks search on what one process would. The mean ``|X|`` uses every batch.
        finish: called with each block's layer names once the block's outputs are taken (the caller may round
            and replace those layers now; the next block was calibrated on the scaled float block).

    Returns:
        One :class:`AWQGroup` per group of Linears, in execution order.
    """
    done: list[AWQGroup] = []
    tokens = [token_count(b) for b in batches]
    budget = max(1, max_search_tokens // world_size())  # per rank: the ranks' searches sum their errors
    with eval_mode(model), torch.no_grad(), Progress(len(layers), "AWQ layers") as bar:
        for stage in sequential_stages(model, layers, batches, finish):
            search = _search_passes(stage.passes, tokens, budget)
            prefix = _common_prefix(list(stage.layers))
            block = model.get_submodule(prefix) if prefix else model
            inner = {
                _join(prefix, n): m for n, m in block.named_modules() if is_foldable_norm(m) or isinstance(m, nn.Linear)
            }
            flow = dataflow(stage.passes[0].run, stage.layers, inner)
            for index, group in enumerate(flow.groups):
                producer = flow.producers.get(index)
                if producer is None:
                    producer = _linear_producer(stage.layers, block, prefix, group, stage.passes)
                done.append(_scale_group(model, stage.layers, block, prefix, group, producer, stage.passes, search,
                                         bits, group_size, symmetric, grid))  # fmt: skip
            if clip:
                _clip_layers(stage.layers, search, bits, group_size, symmetric, budget)
            for name in stage.layers:
                broadcast_(stage.layers[name].weight.data)
                bar.step(name)
    log.info("AWQ: %d groups, %d scaled", len(done), sum(g.s is not None for g in done))
    return done


def _scale_group(
    model: nn.Module,
    stage_layers: Mapping[str, nn.Module],
    block: nn.Module,
    prefix: str,
    group: list[str],
    producer: str | None,
    passes: Sequence[Pass],
    search: Sequence[Pass],
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int,
) -> AWQGroup:
    """Search ``α`` for one group on the module holding it, then fold ``s`` into ``producer``."""
    if producer is None:
        return AWQGroup(group, None, None, None)
    act_mean = _mean_abs_inputs(group[0], stage_layers[group[0]], passes)
    holder = _holder(block, prefix, group)
    calls = _capture_calls(holder, search)
    reference = [first_tensor(holder(*a, **k)) for a, k in calls]
    original = {n: stage_layers[n].weight.detach().clone() for n in group}
    errors = []
    for i in range(grid):
        s = awq_factors(act_mean, i / grid).to(act_mean.device)
        for n in group:
            stage_layers[n].weight.copy_(scaled_fake_quant(original[n].float(), s, bits, group_size, symmetric))
        err = sum(float((first_tensor(holder(*a, **k)).float() - r.float()).square().mean()) for (a, k), r in
                  zip(calls, reference, strict=True))  # fmt: skip
        errors.append(err)
    for n in group:
        stage_layers[n].weight.copy_(original[n])
    errors_t = all_reduce_(torch.tensor(errors, dtype=torch.float64, device=act_mean.device), "sum")
    alpha = int(torch.argmin(errors_t)) / grid
    s = awq_factors(act_mean, alpha)
    fold_group(model, stage_layers, SmoothGroup(group, producer), s)
    return AWQGroup(group, producer, s, alpha)


def _clip_layers(
    stage_layers: Mapping[str, nn.Module],
    search: Sequence[Pass],
    bits: int,
    group_size: int | None,
    symmetric: bool,
    max_tokens: int,
) -> None:
    """Clamp each layer's weight to the ranges of :func:`~lightning_compress.functional.awq.clip_ratios` on (at most
    ``max_tokens`` of) its scaled inputs over ``search``."""
    inputs: dict[str, list[Tensor]] = {n: [] for n in stage_layers}

    def update(name: str, _: nn.Module, x: Tensor) -> None:
        have = sum(t.shape[0] for t in inputs[name])
        if have < max_tokens:
            inputs[name].append(x.reshape(-1, x.shape[-1])[: max_tokens - have])

    accumulate_inputs(stage_layers, search, update)
    for name, layer in stage_layers.items():
        if inputs[name]:
            w = layer.weight.detach()
            ratios = clip_ratios(w, torch.cat(inputs[name]), bits, group_size, symmetric,
                                 reduce=lambda e: all_reduce_(e, "sum"))  # fmt: skip
            layer.weight.copy_(clip_weight(w.float(), ratios.to(w.device)).to(w.dtype))
