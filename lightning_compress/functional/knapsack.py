"""Multiple-choice knapsack: one option per item, the least total loss within a cost budget (or the least cost
within a loss budget), solved exactly by dynamic programming over integer costs, with a Lagrangian lower bound.

Each item ``i`` (a layer, or layers tied together) has options ``k`` with a loss ``losses[i, k]`` (``inf`` where the
option is not allowed) and a non-negative integer cost ``costs[i, k]`` (bits, weights kept). The exact programme is
``best_c = min_k loss_k + best'_{c - cost_k}`` over capacities ``c`` (Kellerer, Pferschy & Pisinger, "Knapsack
Problems", ch. 11). :func:`integer_costs` brings large costs to at most ``max_bins`` units, rounding costs up and
the capacity down, so a plan for the coarse problem always fits the real budget.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Binned(NamedTuple):
    """Costs in units of ``unit`` (rounded up, each row's cheapest option taken out) and the capacity left
    (rounded down); ``exact`` when no rounding happened (``unit`` divides every cost)."""

    costs: Tensor
    capacity: int
    unit: int
    exact: bool


def _check(losses: Tensor, costs: Tensor) -> None:
    if losses.dim() != 2 or costs.shape != losses.shape:
        raise ValueError(f"losses and costs must both be (items, options), got {tuple(losses.shape)}, "
                         f"{tuple(costs.shape)}")  # fmt: skip
    if costs.is_floating_point() or bool((costs < 0).any()):
        raise ValueError("costs must be non-negative integers")
    if bool(torch.isnan(losses).any()) or bool((losses == -math.inf).any()):
        raise ValueError("losses must be numbers or +inf (an option not allowed), not NaN or -inf")
    if not bool(torch.isfinite(losses).any(dim=1).all()):
        raise ValueError("every item needs at least one allowed (finite-loss) option")


def integer_costs(losses: Tensor, costs: Tensor, capacity: int, max_bins: int = 100_000) -> Binned:
    """``costs (L, K)`` and ``capacity`` in units small enough for a table of at most ``max_bins + 1`` entries.

    Each row's cheapest allowed cost is taken out of its row and of the capacity first (every plan pays it), and
    the unit is the gcd of what is left, so the result is exact whenever that fits; past ``max_bins`` the unit is
    coarsened, costs rounded up and the capacity down (a coarse plan still fits ``capacity``).
    """
    _check(losses, costs)
    allowed = torch.isfinite(losses)
    base = torch.where(allowed, costs, torch.iinfo(torch.long).max).min(dim=1).values
    extra = torch.where(allowed, costs - base[:, None], 0)
    capacity = int(capacity) - int(base.sum())
    unit = math.gcd(*extra.flatten().tolist()) or 1
    exact = True
    if capacity > 0 and capacity // unit > max_bins:
        unit *= math.ceil(capacity / unit / max_bins)
        exact = bool((extra % unit == 0).all())
    return Binned(-(-extra // unit), capacity // unit if capacity >= 0 else -1, unit, exact)


def knapsack_table(losses: Tensor, costs: Tensor, capacity: int) -> tuple[Tensor, list[Tensor]]:
    """The exact programme: ``best[c]``, the least total loss of one option per row with total cost ``<= c``, for
    ``c = 0..capacity`` (``(capacity + 1,)`` float64, ``inf`` where nothing fits), and each row's choice ``(capacity
    + 1,)`` for :func:`backtrack`. Shapes: ``losses (L, K)`` float, ``costs (L, K)`` non-negative integers. Ties go to
    the lower option index."""
    _check(losses, costs)
    best = torch.zeros(capacity + 1, dtype=torch.float64)
    steps = torch.arange(capacity + 1)
    choices = []
    for loss, cost in zip(losses.to(torch.float64), costs, strict=True):
        before = steps - cost[:, None]  # (K, capacity + 1)
        candidates = best[before.clamp_min(0)] + loss[:, None]
        candidates = candidates.masked_fill(before < 0, math.inf)
        best, pick = candidates.min(dim=0)
        choices.append(pick.to(torch.int16))
    return best, choices


def backtrack(costs: Tensor, choices: list[Tensor], capacity: int) -> list[int]:
    """The options of :func:`knapsack_table`'s solution at ``capacity`` (one index per row)."""
    picks, c = [], capacity
    for cost, choice in zip(reversed(costs), reversed(choices), strict=True):
        picks.append(int(choice[c]))
        c -= int(cost[picks[-1]])
    return picks[::-1]


def min_loss_choice(losses: Tensor, costs: Tensor, capacity: int) -> list[int] | None:
    """One option per row of least total loss with ``sum cost <= capacity`` (exact); None when nothing fits."""
    if capacity < 0:
        return None
    best, choices = knapsack_table(losses, costs, capacity)
    return backtrack(costs, choices, capacity) if math.isfinite(best[capacity]) else None


def min_cost_choice(losses: Tensor, costs: Tensor, max_loss: float) -> list[int] | None:
    """One option per row of least total cost with ``sum loss <= max_loss`` (exact over the integer costs; among
    plans of that cost, the least loss); None when even the least-loss plan exceeds ``max_loss``."""
    top = int(torch.where(torch.isfinite(losses), costs, 0).max(dim=1).values.sum())
    best, choices = knapsack_table(losses, costs, top)
    fits = (best <= max_loss).nonzero()
    return None if not len(fits) else backtrack(costs, choices, int(fits[0]))


def lagrangian_bound(losses: Tensor, costs: Tensor, capacity: float, iterations: int = 100) -> float:
    """A lower bound on the least total loss within ``capacity``: ``max_λ≥0 Σ_i min_k (loss_ik + λ cost_ik) − λ C``
    (the Lagrangian dual, equal to the LP relaxation's optimum), by bisection on its subgradient. Any plan's loss
    minus this bound bounds how far that plan is from optimal."""
    losses, costs = losses.to(torch.float64), costs.to(torch.float64)

    def dual(lam: float) -> tuple[float, float]:
        value, pick = (losses + lam * costs).min(dim=1)
        return float(value.sum()) - lam * capacity, float(costs.gather(1, pick[:, None]).sum()) - capacity

    finite = torch.isfinite(losses)
    span = float((losses.where(finite, -math.inf).max(1).values - losses.where(finite, math.inf).min(1).values).sum())
    gaps = costs[costs > 0]
    lo, hi = 0.0, (span + 1.0) / (float(gaps.min()) if len(gaps) else 1.0)
    bound = dual(0.0)[0]
    for _ in range(iterations):
        mid = (lo + hi) / 2
        value, slope = dual(mid)
        bound = max(bound, value)
        lo, hi = (mid, hi) if slope > 0 else (lo, mid)
    return max(bound, dual(hi)[0])
