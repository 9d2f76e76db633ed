"""SmoothQuant (Xiao et al. 2023) on the calibration engine's block walk: find what feeds each Linear, measure,
smooth, verify, block by block (:func:`smoothquant_model`).

1. :func:`find_mappings` (one pass over a block, or a whole model): Linears reading the very same tensor form a
   group (q, k, v), and the LayerNorm / RMSNorm / Linear whose output *is* that tensor is the group's producer —
   found automatically, or restricted by regex mappings.
2. :func:`group_absmax` keeps a running per-channel ``max |X_j|`` per group (hooks; never storing activations),
   all-reduced with ``max`` across data-parallel ranks.
3. :func:`smooth_groups` computes ``s`` (:func:`~lightning_compress.functional.smoothquant.smoothing_factors`),
   folds ``1/s`` into each producer and ``s`` into the consumers' weights, and checks that the block's outputs did
   not change. A fold that changes them (the producer's output also feeds a residual, as in post-LN BERT, or the
   norm's affine is not ``gamma · x̂ + beta``) is undone; its group, like a group with no producer inside the block,
   keeps an explicit per-channel ``1/s`` in front of the layer instead (returned to the caller).

Being on the block walk, SmoothQuant runs on a streamed model (:mod:`lightning_compress.streaming`) unchanged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_compress.calibration.batches import call_model, relative_error, token_mask
from lightning_compress.calibration.capture import eval_mode
from lightning_compress.calibration.dataflow import dataflow
from lightning_compress.calibration.engine import Pass, accumulate_inputs, sequential_stages
from lightning_compress.calibration.progress import Progress
from lightning_compress.functional.smoothquant import (
    fold_into_linear,
    fold_into_norm,
    scale_weight,
    smoothing_factors,
    weight_absmax,
)
from lightning_compress.nn.distributed import all_reduce_

log = logging.getLogger(__name__)

# Smoothing may change a model's outputs by float rounding only: at most this relative error on a calibration batch.
FOLD_TOLERANCE = 1e-3


class SmoothGroup(NamedTuple):
    """Linears that read one tensor, and the module (if any) that produced it and may absorb ``1/s``."""

    layers: list[str]
    producer: str | None


def is_foldable_norm(module: nn.Module) -> bool:
    """A LayerNorm / RMSNorm over the last dimension with a per-channel affine weight ``(in,)``."""
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1


def _compiled(mappings: Sequence[tuple[str, str]] | None) -> list[tuple[re.Pattern[str], re.Pattern[str]]] | None:
    return None if mappings is None else [(re.compile(p), re.compile(c)) for p, c in mappings]


def _groups(
    run: Callable[[], Any],
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    compiled: list[tuple[re.Pattern[str], re.Pattern[str]]] | None,
    used: set[int],
) -> list[SmoothGroup]:
    """The groups of ``layers`` seen in one pass ``run()``, each with its producer (restricted by ``compiled``
    mappings; the indices of the mappings that matched are added to ``used``)."""
    candidates = {n: m for n, m in model.named_modules() if is_foldable_norm(m) or isinstance(m, nn.Linear)}
    flow = dataflow(run, layers, candidates)
    groups = [SmoothGroup(g, flow.producers.get(i)) for i, g in enumerate(flow.groups)]
    if compiled is None:
        return groups
    result = []
    for group in groups:
        match = next(
            (i for i, (p, c) in enumerate(compiled)
             if group.producer and p.fullmatch(group.producer) and all(c.fullmatch(n) for n in group.layers)),
            None,
        )  # fmt: skip
        if match is not None:
            used.add(match)
        result.append(SmoothGroup(group.layers, None if match is None else group.producer))
    return result


def _check_used(mappings: Sequence[tuple[str, str]] | None, used: set[int]) -> None:
    unused = [tuple(m) for i, m in enumerate(mappings or []) if i not in used]
    if unused:
        raise ValueError(f"mappings {unused} match no producer whose output feeds only layers matching the consumers")


def find_mappings(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batch: Any,
    mappings: Sequence[tuple[str, str]] | None = None,
) -> list[SmoothGroup]:
    """Group ``layers`` by shared input and attach each group's producer, from one forward pass on ``batch``.

    Args:
        model: the model; ``batch`` is one calibration input.
        layers: the Linears to smooth, ``{name: module}``.
        batch: one calibration batch.
        mappings: None finds producers automatically among foldable norms and Linears. Otherwise a list of
            ``(producer regex, consumers regex)``: only a producer whose name fully matches a mapping's first
            regex counts, and only for a group whose layers all fully match its second.

    Raises:
        ValueError: a mapping that matches no (producer, group) pair.
    """
    used: set[int] = set()
    groups = _groups(lambda: call_model(model, batch), model, layers, _compiled(mappings), used)
    _check_used(mappings, used)
    return groups


def group_absmax(
    layers: Mapping[str, nn.Module], groups: Sequence[SmoothGroup], passes: Sequence[Pass]
) -> list[Tensor]:
    """Per group, the running per-input-channel ``max |X_j|`` ``(in,)`` over the real tokens of ``passes`` (float32,
    DDP ``max``); zeros for a group the passes never reach."""
    first = {g.layers[0]: i for i, g in enumerate(groups)}
    stats: list[Tensor | None] = [None] * len(groups)

    def update(name: str, _: nn.Module, x: Tensor) -> None:
        i = first[name]
        cur = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[i] = cur if stats[i] is None else torch.maximum(stats[i], cur)

    accumulate_inputs({n: layers[n] for n in first}, passes, update, stop_early=False)
    result = []
    for g, s in zip(groups, stats, strict=True):
        s = torch.zeros(layers[g.layers[0]].in_features) if s is None else s  # never called: nothing to smooth
        result.append(all_reduce_(s.to(layers[g.layers[0]].weight.device), "max"))
    return result


@torch.no_grad()
def activation_absmax(
    model: nn.Module, layers: Mapping[str, nn.Module], groups: Sequence[SmoothGroup], batches: Sequence[Any]
) -> list[Tensor]:
    """:func:`group_absmax` over whole-model passes on ``batches``."""
    passes = [Pass(lambda b=b: call_model(model, b), token_mask(b)) for b in batches]
    return group_absmax(layers, groups, passes)


def fold_group(model: nn.Module, layers: Mapping[str, nn.Module], group: SmoothGroup, s: Tensor) -> None:
    """Fold ``1/s`` into the group's producer and ``s`` into its layers' weights (in place)."""
    producer = model.get_submodule(group.producer)
    fold = fold_into_norm if is_foldable_norm(producer) else fold_into_linear
    bias = getattr(producer, "bias", None)
    weight, bias = fold(producer.weight.detach(), None if bias is None else bias.detach(), s)
    producer.weight.copy_(weight)
    if bias is not None:
        producer.bias.copy_(bias)
    for name in group.layers:
        layers[name].weight.copy_(scale_weight(layers[name].weight.detach(), s))


class Smoothing(NamedTuple):
    """How one group was smoothed: its factors ``s`` (ones when not smoothed) and whether ``x / s`` must stay
    explicit in front of its layers (no producer could absorb it)."""

    s: Tensor
    explicit: bool


@torch.no_grad()
def smooth_groups(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    groups: Sequence[SmoothGroup],
    act_absmax: Sequence[Tensor],
    run: Callable[[], Any],
    alpha: float = 0.5,
    explicit_scales: bool = True,
) -> list[Smoothing]:
    """Smooth ``groups`` in place; returns one :class:`Smoothing` per group.

    Folds into producers are verified on the outputs of ``run()`` (a forward over the part of the model that holds
    the groups, e.g. one block; relative error ≤ :data:`FOLD_TOLERANCE`, the largest over the data-parallel ranks so
    every rank decides alike): all at once, and one by one when that fails, undoing the folds that change the
    outputs. Groups left without a producer get ``explicit=True`` when ``explicit_scales`` (their weights are not
    changed here: :func:`scale_explicit` multiplies them by ``s`` once nothing runs them without the ``x / s`` in
    front), and no smoothing otherwise; a group that never ran keeps ``s = 1``.
    """
    factors = [
        smoothing_factors(a, weight_absmax([layers[n].weight for n in g.layers]).float(), alpha)
        if a.any()
        else torch.ones_like(a)
        for g, a in zip(groups, act_absmax, strict=True)
    ]
    reference = run()
    device = layers[groups[0].layers[0]].weight.device if groups else None

    def changed() -> bool:
        error = torch.tensor(relative_error(reference, run()), device=device)
        return float(all_reduce_(error, "max")) > FOLD_TOLERANCE

    touched = {g.producer for g in groups if g.producer} | {n for g in groups if g.producer for n in g.layers}
    original = {n: [p.detach().clone() for p in model.get_submodule(n).parameters(recurse=False)] for n in touched}

    def restore(names: set[str]) -> None:
        for n in names:
            for p, saved in zip(model.get_submodule(n).parameters(recurse=False), original[n], strict=True):
                p.copy_(saved)

    folded = [i for i, g in enumerate(groups) if g.producer]
    for i in folded:
        fold_group(model, layers, groups[i], factors[i])
    if folded and changed():
        restore(touched)
        kept = []
        for i in folded:
            fold_group(model, layers, groups[i], factors[i])
            if not changed():
                kept.append(i)
            else:
                restore({groups[i].producer, *groups[i].layers})
                log.info("SmoothQuant: folding into %s changes the outputs; explicit scale", groups[i].producer)
        folded = kept
    result = []
    for i in range(len(groups)):
        if i in folded:
            result.append(Smoothing(factors[i], False))
        elif explicit_scales:
            result.append(Smoothing(factors[i], True))
        else:
            result.append(Smoothing(torch.ones_like(factors[i]), False))
    return result


@torch.no_grad()
def scale_explicit(layers: Mapping[str, nn.Module], group: SmoothGroup, smoothing: Smoothing | None) -> None:
    """Multiply the weights of an explicitly smoothed group by ``s`` (in place; the caller divides their inputs by
    ``s``); nothing for a folded or unsmoothed group."""
    if smoothing is not None and smoothing.explicit:
        for name in group.layers:
            layers[name].weight.copy_(scale_weight(layers[name].weight.detach(), smoothing.s))


class SmoothedGroup(NamedTuple):
    """One group after SmoothQuant: its layers and producer, its input's per-channel ``max |X_j|`` ``(in,)`` before
    smoothing, and how it was smoothed (None: not smoothed)."""

    group: SmoothGroup
    absmax: Tensor
    smoothing: Smoothing | None


@torch.no_grad()
def smoothquant_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    finish: Callable[[list[SmoothedGroup]], None],
    alpha: float | None = 0.5,
    explicit_scales: bool = True,
    mappings: Sequence[tuple[str, str]] | None = None,
) -> None:
    """Smooth ``layers`` (Linears) of ``model`` in place with SmoothQuant (Xiao et al. 2023), block by block.

    On the engine's walk (:func:`~lightning_compress.calibration.engine.sequential_stages`), per block: the groups
    and their producers from one pass (:func:`find_mappings`' rules, producers inside the block), the running
    per-channel ``max |X_j|`` over every batch's real tokens (DDP ``max``), then the folds, verified on the block's
    outputs (:func:`smooth_groups`). The next block's inputs come from the smoothed, still float, block (folds
    only: what the model computed before); then the weights of explicitly smoothed groups are multiplied by ``s``
    and ``finish(groups)`` receives the block's :class:`SmoothedGroup` s (the caller divides those groups' inputs
    by ``s``, quantizes and replaces the layers). Layers outside the block stack come last, measured on whole-model
    passes through the blocks as ``finish`` left them (quantized, as GPTQ's walk does). ``alpha=None`` measures
    without smoothing.

    Raises:
        ValueError: a mapping that matched no (producer, group) pair in any block (after the walk).
    """
    compiled = _compiled(mappings if alpha is not None else [])
    used: set[int] = set()
    pending: list[SmoothedGroup] = []

    def done(_: list[str]) -> None:  # the block's outputs are taken: explicit groups may now carry s
        for g in pending:
            scale_explicit(layers, g.group, g.smoothing)
        finish(list(pending))
        pending.clear()

    with eval_mode(model), Progress(len(layers), "SmoothQuant layers") as bar:
        for stage in sequential_stages(model, layers, batches, done):
            verify = stage.passes[0].run
            groups = _groups(verify, model, stage.layers, compiled, used)
            absmax = group_absmax(stage.layers, groups, stage.passes)
            smoothing = (
                [None] * len(groups)
                if alpha is None
                else smooth_groups(model, stage.layers, groups, absmax, verify, alpha, explicit_scales)
            )
            pending.extend(SmoothedGroup(*t) for t in zip(groups, absmax, smoothing, strict=True))
            for name in stage.layers:
                bar.step(name)
    _check_used(mappings if alpha is not None else None, used)
