"""The multiple-choice knapsack: exact against brute force, the coarse tables still fit, the Lagrangian bound holds."""

import itertools
import math

import pytest
import torch

from lightning_compress.functional.knapsack import (
    integer_costs,
    lagrangian_bound,
    min_cost_choice,
    min_loss_choice,
)


def _random_case(seed: int, items: int = 4, options: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(items, options, generator=g, dtype=torch.float64)
    costs = torch.randint(0, 20, (items, options), generator=g)
    losses[torch.rand(items, options, generator=g) < 0.2] = math.inf  # some options not allowed
    losses[:, 0] = losses[:, 0].nan_to_num(posinf=0.5)  # at least one allowed per item
    return losses, costs


def _brute_force(losses, costs, capacity=None, max_loss=None):
    """The best plan by enumerating every combination: (loss, cost) of the optimum, or None."""
    best = None
    for picks in itertools.product(range(losses.shape[1]), repeat=losses.shape[0]):
        loss = sum(float(losses[i, k]) for i, k in enumerate(picks))
        cost = sum(int(costs[i, k]) for i, k in enumerate(picks))
        if not math.isfinite(loss):
            continue
        if capacity is not None and cost <= capacity:
            key = (loss, cost)
        elif max_loss is not None and loss <= max_loss + 1e-12:
            key = (cost, loss)
        else:
            continue
        best = key if best is None or key < best else best
    return best


def _total(losses, costs, picks):
    return sum(float(losses[i, k]) for i, k in enumerate(picks)), sum(int(costs[i, k]) for i, k in enumerate(picks))


@pytest.mark.parametrize("seed", range(30))
def test_min_loss_choice_is_the_brute_force_optimum(seed):
    losses, costs = _random_case(seed)
    for capacity in (0, 10, 25, 40, 80):
        picks = min_loss_choice(losses, costs, capacity)
        expected = _brute_force(losses, costs, capacity=capacity)
        if expected is None:
            assert picks is None
            continue
        loss, cost = _total(losses, costs, picks)
        assert cost <= capacity and loss == pytest.approx(expected[0], abs=1e-12)
        assert lagrangian_bound(losses, costs, capacity) <= loss + 1e-9  # a lower bound on the optimum


@pytest.mark.parametrize("seed", range(30))
def test_min_cost_choice_is_the_brute_force_optimum(seed):
    losses, costs = _random_case(seed)
    least = float(losses.min(dim=1).values.sum())
    for max_loss in (least, least + 0.3, least + 1.0, 10.0):
        picks = min_cost_choice(losses, costs, max_loss)
        loss, cost = _total(losses, costs, picks)
        expected = _brute_force(losses, costs, max_loss=max_loss)
        assert loss <= max_loss + 1e-12 and cost == expected[0]
    assert min_cost_choice(losses, costs, least - 0.01) is None


def test_integer_costs_are_exact_by_the_gcd_and_coarse_tables_still_fit():
    losses = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 5.0]], dtype=torch.float64)
    costs = torch.tensor([[4000, 2000, 1000], [6000, 3000, 1000]])
    binned = integer_costs(losses, costs, 5000)
    assert binned.exact and binned.unit == 1000 and binned.capacity == 3  # 5000 - 2000 (the cheapest of each)
    assert binned.costs.tolist() == [[3, 1, 0], [5, 2, 0]]
    picks = min_loss_choice(losses, binned.costs, binned.capacity)
    assert picks == [1, 1] and _total(losses, costs, picks) == (3.0, 5000)
    g = torch.Generator().manual_seed(0)
    big = torch.randint(10_000, 10_000_000, (6, 4), generator=g)
    noisy = torch.rand(6, 4, generator=g, dtype=torch.float64)
    for capacity in (int(big.min(1).values.sum()) + 10**6, int(big.sum() // 3)):
        coarse = integer_costs(noisy, big, capacity, max_bins=50)
        assert not coarse.exact and coarse.capacity <= 50
        picks = min_loss_choice(noisy, coarse.costs, coarse.capacity)
        loss, cost = _total(noisy, big, picks)
        assert cost <= capacity  # rounded up, so the real budget holds
        assert loss >= _brute_force(noisy, big, capacity=capacity)[0] - 1e-12


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="non-negative integers"):
        min_loss_choice(torch.zeros(2, 2), torch.full((2, 2), -1), 3)
    with pytest.raises(ValueError, match="at least one allowed"):
        min_loss_choice(torch.full((2, 2), math.inf), torch.ones(2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\(items, options\)"):
        min_loss_choice(torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.long), 3)
