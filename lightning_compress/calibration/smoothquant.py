"""SmoothQuant over a whole model (Xiao et al. 2023): find what feeds each Linear, measure, smooth, verify.

1. :func:`find_mappings` observes one forward pass: Linears reading the very same tensor form a group (q, k, v),
   and the LayerNorm / RMSNorm / Linear whose output *is* that tensor is the group's producer — found automatically,
   or restricted by regex mappings.
2. :func:`activation_absmax` keeps a running per-channel ``max |X_j|`` per group (hooks; never storing
   activations), all-reduced with ``max`` across data-parallel ranks.
3. :func:`smooth_model` computes ``s`` (:func:`~lightning_compress.functional.smoothquant.smoothing_factors`), folds
   ``1/s`` into each producer and ``s`` into the consumers' weights, and checks on a calibration batch that the
   model's outputs did not change. A fold that changes them (the producer's output also feeds a residual, as in
   post-LN BERT, or the norm's affine is not ``gamma · x̂ + beta``) is undone; its group, like a group with no
   producer, keeps an explicit per-channel ``1/s`` in front of the layer instead (returned to the caller).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_compress.calibration.batches import call_model, head, relative_error, token_mask
from lightning_compress.calibration.dataflow import dataflow
from lightning_compress.calibration.engine import Pass, accumulate_inputs
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
# Samples of the first calibration batch the folds are verified on.
VERIFY_SAMPLES = 4


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
    candidates = {n: m for n, m in model.named_modules() if is_foldable_norm(m) or isinstance(m, nn.Linear)}
    flow = dataflow(lambda: call_model(model, batch), layers, candidates)
    groups = [SmoothGroup(g, flow.producers.get(i)) for i, g in enumerate(flow.groups)]
    if mappings is None:
        return groups
    compiled = [(re.compile(p), re.compile(c)) for p, c in mappings]
    used, result = set(), []
    for group in groups:
        match = next(
            (i for i, (p, c) in enumerate(compiled)
             if group.producer and p.fullmatch(group.producer) and all(c.fullmatch(n) for n in group.layers)),
            None,
        )  # fmt: skip
        used.add(match)
        result.append(SmoothGroup(group.layers, None if match is None else group.producer))
    unused = [tuple(mappings[i]) for i in range(len(mappings)) if i not in used]
    if unused:
        raise ValueError(f"mappings {unused} match no producer whose output feeds only layers matching the consumers")
    return result


@torch.no_grad()
def activation_absmax(
    model: nn.Module, layers: Mapping[str, nn.Module], groups: Sequence[SmoothGroup], batches: Sequence[Any]
) -> list[Tensor]:
    """Per group, the running per-input-channel ``max |X_j|`` ``(in,)`` over all batches' real tokens (float32,
    DDP ``max``)."""
    first = {g.layers[0]: i for i, g in enumerate(groups)}
    stats: list[Tensor | None] = [None] * len(groups)

    def update(name: str, _: nn.Module, x: Tensor) -> None:
        i = first[name]
        cur = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[i] = cur if stats[i] is None else torch.maximum(stats[i], cur)

    with Progress(len(batches), "SmoothQuant calibration") as bar:
        for i, batch in enumerate(batches):
            passes = [Pass(lambda b=batch: call_model(model, b), token_mask(batch))]
            accumulate_inputs({n: layers[n] for n in first}, passes, update, stop_early=False)
            bar.step(f"batch {i}")
    result = []
    for g, s in zip(groups, stats, strict=True):
        s = torch.zeros(layers[g.layers[0]].in_features) if s is None else s  # never called: nothing to smooth
        result.append(all_reduce_(s.to(layers[g.layers[0]].weight.device), "max"))
    return result


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
def smooth_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    groups: Sequence[SmoothGroup],
    act_absmax: Sequence[Tensor],
    batch: Any,
    alpha: float = 0.5,
    explicit_scales: bool = True,
) -> list[Smoothing]:
    """Smooth ``model`` in place; returns one :class:`Smoothing` per group.

    Folds into producers are verified on the first :data:`VERIFY_SAMPLES` samples of ``batch`` (relative output
    error ≤ :data:`FOLD_TOLERANCE`): all at once,
    and one by one when that fails, undoing the folds that change the outputs. Groups left without a producer get
    ``s`` in their weights and ``explicit=True`` (the caller divides their inputs by ``s``) when
    ``explicit_scales``, and no smoothing otherwise; a group that never ran keeps ``s = 1``.
    """
    factors = [
        smoothing_factors(a, weight_absmax([layers[n].weight for n in g.layers]).float(), alpha)
        if a.any()
        else torch.ones_like(a)
        for g, a in zip(groups, act_absmax, strict=True)
    ]
    batch = head(batch, VERIFY_SAMPLES)
    reference = call_model(model, batch)
    touched = {g.producer for g in groups if g.producer} | {n for g in groups if g.producer for n in g.layers}
    original = {n: [p.detach().clone() for p in model.get_submodule(n).parameters(recurse=False)] for n in touched}

    def restore(names: set[str]) -> None:
        for n in names:
            for p, saved in zip(model.get_submodule(n).parameters(recurse=False), original[n], strict=True):
                p.copy_(saved)

    folded = [i for i, g in enumerate(groups) if g.producer]
    for i in folded:
        fold_group(model, layers, groups[i], factors[i])
    if folded and relative_error(reference, call_model(model, batch)) > FOLD_TOLERANCE:
        restore(touched)
        kept = []
        for i in folded:
            fold_group(model, layers, groups[i], factors[i])
            if relative_error(reference, call_model(model, batch)) <= FOLD_TOLERANCE:
                kept.append(i)
            else:
                restore({groups[i].producer, *groups[i].layers})
                log.info("SmoothQuant: folding into %s changes the outputs; explicit scale", groups[i].producer)
        folded = kept
    result = []
    for i, g in enumerate(groups):
        if i in folded:
            result.append(Smoothing(factors[i], False))
        elif explicit_scales:
            for name in g.layers:
                layers[name].weight.copy_(scale_weight(layers[name].weight.detach(), factors[i]))
            result.append(Smoothing(factors[i], True))
        else:
            result.append(Smoothing(torch.ones_like(factors[i]), False))
    return result
