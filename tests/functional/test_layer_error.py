"""The closed-form layer error: exact where GPTQ / SparseGPT have nothing to compensate, close where they do."""

import pytest
import torch

from lightning_compress.functional.gptq import GPTQOptions, gptq_quantize, hessian_update
from lightning_compress.functional.layer_error import column_costs, expected_error
from lightning_compress.functional.sparsegpt import sparsegpt_prune


def _error(weight, new, hessian):
    d = (weight - new).double()
    return ((d @ hessian.double()) * d).sum(dim=1)


def test_column_costs_are_the_solvers_factor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 24, generator=g, dtype=torch.float64)
    h = x.T @ x
    cost, order = column_costs(h, act_order=True, percdamp=0.0)
    assert torch.equal(order, torch.argsort(h.diagonal(), descending=True, stable=True))
    hp = h[order][:, order]
    upper = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)  # the paper's Cholesky(H⁻¹), U = R⁻¹
    torch.testing.assert_close(cost, upper.diagonal().pow(-2))


def test_n_m_error_is_exact_when_the_hessian_is_diagonal():
    """No correlations, no compensation: SparseGPT drops the smallest w² h_jj of each group, and the closed form
    charges exactly those."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 32, generator=g)
    hessian = torch.diag(torch.rand(32, generator=g) + 0.5)
    pruned = sparsegpt_prune(weight, 2 * hessian, nm=(2, 4), options=GPTQOptions(percdamp=0.0)).weight
    expected = expected_error(weight, hessian, nm=(2, 4), percdamp=0.0)
    torch.testing.assert_close(expected, _error(weight, pruned, hessian))


def test_rounding_error_matches_uniform_noise_without_compensation():
    """A diagonal Hessian: GPTQ is round-to-nearest, and a wide layer's error is the Δ²/12 per weight the closed
    form assumes."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(256, 512, generator=g)
    hessian = torch.diag(torch.rand(512, generator=g) + 0.5)
    for bits, group in ((8, None), (4, 128), (3, None)):
        opts = GPTQOptions(bits=bits, group_size=group, symmetric=bits > 4, static_groups=True, percdamp=0.0)
        solved = gptq_quantize(weight, 2 * hessian, opts).weight
        expected = expected_error(weight, hessian, bits, group, bits > 4, clip_search=False, percdamp=0.0)
        assert float(expected.sum() / _error(weight, solved, hessian).sum()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(("bits", "nm"), [(4, None), (3, None), (None, (2, 4)), (8, (2, 4))])
def test_with_correlated_inputs_the_estimate_stays_near_the_solved_error(bits, nm):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g) @ (torch.randn(64, 64, generator=g) * 0.3 + torch.eye(64))
    weight = torch.randn(48, 64, generator=g)
    h = hessian_update(None, x, torch.float32)  # 2 XᵀX, as the solvers take it
    new = weight
    if nm is not None:
        new = sparsegpt_prune(weight, h, nm=nm).weight
    if bits is not None:
        opts = GPTQOptions(bits=bits, symmetric=bits > 4, act_order=True, static_groups=True, clip_search=True)
        new = gptq_quantize(new, h, opts, keep=None if nm is None else new != 0).weight
    ratio = (
        expected_error(weight, h / 2, bits, None, bool(bits and bits > 4), nm).sum() / _error(weight, new, h / 2).sum()
    )
    assert 0.6 < float(ratio) < 1.6
