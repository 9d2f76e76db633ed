"""Per-layer pruning sensitivity: prune one layer at a time, measure, and plan per-layer sparsities.

``sensitivity_scan`` prunes each selected layer alone to each ratio and records a metric (higher is better);
``SensitivityResult.plan`` then picks one ratio per layer reaching a global sparsity at the least predicted loss,
solved as a multiple-choice knapsack by dynamic programming. The scan is the layer-wise sensitivity analysis of
Han et al. 2015 ("Learning both Weights and Connections"); the allocation replaces their choice by hand. The
plan file written by ``save_plan`` feeds ``IterativePruning(plan=PATH)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from lightning_compress.functional.knapsack import integer_costs, min_loss_choice
from lightning_compress.functional.masks import check_sparsity, magnitude_mask, row_mask
from lightning_compress.nn.select import select_layers

log = logging.getLogger(__name__)

DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("magnitude", "rows")
PLAN_HEADER = "# per-layer sparsity plan (written by lightning_compress.sensitivity)\n"


@dataclass(frozen=True)
class SensitivityResult:
    """A sensitivity scan: the metric with each layer alone pruned to each ratio.

    Attributes:
        baseline: the metric with nothing pruned.
        ratios: the scanned sparsities, strictly increasing, each in ``[0, 1)``.
        metrics: ``{layer: (metric at ratios[0], ...)}`` in model order.
        params: ``{layer: weight parameter count}``, the weights of the global sparsity.
        method: how layers were pruned (``"magnitude"`` or ``"rows"``); plan ratios are in the same units.
    """

    baseline: float
    ratios: tuple[float, ...]
    metrics: dict[str, tuple[float, ...]]
    params: dict[str, int]
    method: str = "magnitude"

    def __post_init__(self) -> None:
        ratios = tuple(check_sparsity(r, "ratios") for r in self.ratios)
        if not ratios or any(a >= b for a, b in zip(ratios[:-1], ratios[1:], strict=True)):
            raise ValueError(f"ratios must be non-empty and strictly increasing, got {self.ratios}")
        if not self.metrics or set(self.metrics) != set(self.params):
            raise ValueError(
                f"metrics and params must name the same layers, got {list(self.metrics)}, {list(self.params)}"
            )
        for name, curve in self.metrics.items():
            if len(curve) != len(ratios) or not all(math.isfinite(m) for m in (*curve, self.baseline)):
                raise ValueError(
                    f"layer {name!r}: need {len(ratios)} finite metrics and a finite baseline, got {curve}"
                )
            if not isinstance(self.params[name], int) or self.params[name] < 1:
                raise ValueError(f"layer {name!r}: params must be a positive int, got {self.params[name]!r}")
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "metrics", {n: tuple(float(m) for m in c) for n, c in self.metrics.items()})
        object.__setattr__(self, "baseline", float(self.baseline))

    def to_markdown(self) -> str:
        """A caption with the baseline, then a table: layer, params, and the metric at each ratio."""
        head = "| layer | params | " + " | ".join(f"{r:g}" for r in self.ratios) + " |"
        rule = "|---|---:|" + "---:|" * len(self.ratios)
        rows = [
            f"| {n} | {self.params[n]:,} | " + " | ".join(f"{m:.4f}" for m in curve) + " |"
            for n, curve in self.metrics.items()
        ]
        caption = f"Metric with one layer pruned at a time ({self.method}); baseline {self.baseline:.4f}.\n"
        return "\n".join([caption, head, rule, *rows]) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: one curve per layer (metric vs sparsity, starting at the baseline), baseline dashed."""
        from matplotlib.figure import Figure  # no pyplot: renders with Agg and touches no global backend

        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for name, curve in self.metrics.items():
            ax.plot((0.0, *self.ratios), (self.baseline, *curve), marker="o", markersize=3, label=name)
        ax.axhline(self.baseline, color="black", linestyle="--", linewidth=1, label="baseline")
        ax.set(xlabel=f"sparsity of the layer ({self.method})", ylabel="metric", title="pruning sensitivity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        path = Path(path)
        fig.savefig(path, format="png", dpi=120)
        return path

    def metric_at(self, layer: str, ratio: float) -> float:
        """The scanned metric of ``layer`` at ``ratio`` (the baseline at 0)."""
        if ratio == 0:
            return self.baseline
        if ratio not in self.ratios:
            raise ValueError(f"ratio {ratio} of layer {layer!r} was not scanned; allowed: 0 or {self.ratios}")
        return self.metrics[layer][self.ratios.index(ratio)]

    def predicted_loss(self, plan: dict[str, float]) -> float:
        """Sum over layers of ``baseline - metric`` at the plan's ratio (each layer's drop, assumed additive)."""
        return sum(self.baseline - self.metric_at(n, r) for n, r in plan.items())

    def plan_sparsity(self, plan: dict[str, float]) -> float:
        """Parameter-weighted sparsity of ``plan`` over the scanned layers: ``sum r_i p_i / sum p_i``."""
        return sum(r * self.params[n] for n, r in plan.items()) / sum(self.params.values())

    def plan(self, target_sparsity: float, max_bins: int = 100_000) -> dict[str, float]:
        """Per-layer ratios (0 or a scanned ratio) reaching ``target_sparsity`` at the least predicted loss.

        Minimises ``sum_i (baseline - metric_i(r_i))`` subject to ``sum_i r_i p_i >= target * sum_i p_i`` by a
        multiple-choice knapsack over layers (:mod:`~lightning_compress.functional.knapsack`). Kept counts are exact
        integers (ratios as fractions over a common denominator, divided by their gcd), so the result is optimal
        whenever the table fits in ``max_bins`` units; beyond that counts are rounded up to a coarser unit, which
        keeps the target met but may cost a little optimality. Ties go to the lower ratio.

        Args:
            target_sparsity: global sparsity over the scanned layers, in ``[0, largest ratio]``.
            max_bins: size bound of the dynamic programme's table.

        Returns:
            ``{layer: ratio}`` for every scanned layer, 0.0 for layers left dense.

        Raises:
            ValueError: the target is not in ``[0, 1)`` or above the largest scanned ratio.
        """
        target = check_sparsity(target_sparsity, "target_sparsity")
        names, options = list(self.metrics), (0.0, *self.ratios)
        kept, capacity = _kept_counts(options, [self.params[n] for n in names], target)
        losses = torch.tensor(
            [[0.0, *(self.baseline - m for m in self.metrics[n])] for n in names], dtype=torch.float64
        )
        binned = integer_costs(losses, kept, capacity, max_bins)
        picks = min_loss_choice(losses, binned.costs, binned.capacity)
        if picks is None:  # only when coarsened: rounding lost the few units that separated the target from reach
            log.warning("plan: coarse table cannot reach target %s; every layer gets the largest ratio", target)
            picks = [len(options) - 1] * len(names)
        plan = {n: options[k] for n, k in zip(names, picks, strict=True)}
        log.info(
            "plan for %s: sparsity %.4f, predicted loss %.4f",
            target,
            self.plan_sparsity(plan),
            self.predicted_loss(plan),
        )
        return plan


def _kept_counts(options: Sequence[float], params: Sequence[int], target: float) -> tuple[Tensor, int]:
    """Weights kept by every (layer, option) as exact integers ``(L, K)`` and the most the target allows.

    Ratios become fractions over a common denominator ``D``, so ``(1 - r) * p * D`` is an integer and the target
    ``sum kept <= (1 - target) * sum p * D`` is tested exactly.

    Raises:
        ValueError: even the largest option on every layer misses the target.
    """
    fracs = [Fraction(r).limit_denominator(10_000) for r in options]
    scale = math.lcm(*(f.denominator for f in fracs))
    kept = torch.tensor([[int((1 - f) * scale) * p for f in fracs] for p in params], dtype=torch.long)
    capacity = math.floor((1 - Fraction(target).limit_denominator(1_000_000)) * scale * sum(params))
    if capacity < int(kept[:, -1].sum()):
        raise ValueError(
            f"target_sparsity={target} cannot be reached: the largest scanned ratio is {options[-1]}; "
            "scan higher ratios or lower the target"
        )
    return kept, capacity


def _pruned(weight: Tensor, bias: Tensor | None, ratio: float, method: str) -> tuple[Tensor, Tensor | None]:
    """``weight`` (and ``bias``) pruned to ``ratio``: by magnitude, or whole rows together with their bias."""
    if method == "magnitude":
        return weight * magnitude_mask(weight, ratio), bias
    keep = row_mask(weight, ratio)
    return weight * keep, None if bias is None else bias * keep.reshape(weight.shape[0], -1)[:, 0]


def _assign(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Copy values into the layer's own ``weight`` / ``bias`` Parameters (same objects, same storage)."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)


def sensitivity_scan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    method: str = "magnitude",
) -> SensitivityResult:
    """Prune each selected layer alone to each ratio, evaluate, and restore it bit-identically.

    Cost: ``1 + layers * len(ratios)`` calls of ``evaluate``. Layers are restored even if ``evaluate`` raises.

    Args:
        model: the model; only the selected layers' ``weight`` (and ``bias`` for rows) are touched, in place.
        evaluate: ``model -> metric``, higher is better (e.g. validation accuracy).
        ratios: sparsities to try, each in ``[0, 1)``; sorted and deduplicated.
        targets, ignore: regexes over ``named_modules()`` names, as in ``select_layers`` (default every
            Linear and Conv).
        method: ``"magnitude"`` (unstructured, ``magnitude_mask``) or ``"rows"`` (whole output rows / filters by
            L1 norm, ``row_mask``, zeroing the bias of removed rows).

    Returns:
        The baseline, per-layer metric curves and weight parameter counts.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {METHODS}")
    ratios = tuple(sorted({check_sparsity(r, "ratios") for r in ratios}))
    if not ratios:
        raise ValueError("ratios must hold at least one sparsity in [0, 1)")
    layers = select_layers(model, targets, ignore)
    baseline = float(evaluate(model))
    metrics = {}
    for name, layer in tqdm(layers.items(), desc="sensitivity", unit="layer", disable=None):
        metrics[name] = tuple(_scan_layer(model, layer, evaluate, ratios, method))
        log.info("%s: %s", name, ", ".join(f"{r:g}: {m:.4f}" for r, m in zip(ratios, metrics[name], strict=True)))
    params = {name: layer.weight.numel() for name, layer in layers.items()}
    return SensitivityResult(baseline, ratios, metrics, params, method)


def _scan_layer(
    model: nn.Module, layer: nn.Module, evaluate: Callable[[nn.Module], float], ratios: Sequence[float], method: str
) -> list[float]:
    """Metric of ``model`` with ``layer`` pruned to each ratio; the layer's tensors are restored in any case."""
    bias = getattr(layer, "bias", None)
    weight, bias = layer.weight.detach().clone(), None if bias is None else bias.detach().clone()
    curve = []
    try:
        for ratio in ratios:
            _assign(layer, *_pruned(weight, bias, ratio, method))
            curve.append(float(evaluate(model)))
    finally:
        _assign(layer, weight, bias)
    return curve


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy of ``model`` over ``(x, y)`` batches in eval mode; the model's train/eval mode is restored."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    correct = total = 0
    try:
        for x, y in batches:
            correct += int((model(x.to(device)).argmax(dim=-1) == y.to(device)).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if not total:
        raise ValueError("batches must hold at least one sample")
    return correct / total


def save_plan(plan: dict[str, float], path: str | Path, target: float) -> None:
    """Write a per-layer plan as YAML: a header comment, ``target: T`` and a ``layers: {name: ratio}`` mapping.

    The file is what ``IterativePruning(plan=PATH)`` reads. Layers left dense are written with 0.0 so that
    the callback does not give them its default sparsity.
    """
    layers = {str(n): check_sparsity(r, f"plan[{n!r}]") for n, r in plan.items()}
    body = {"target": check_sparsity(target, "target"), "layers": layers}
    Path(path).write_text(PLAN_HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False))
