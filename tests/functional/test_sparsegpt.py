"""SparseGPT's fast solver (GPTQ's column loop) against the paper's algorithm in float64, and what it must beat."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.functional.gptq import GPTQOptions, hessian_update
from lightning_compress.functional.masks import nm_mask
from lightning_compress.functional.quant import dequantize, quant_range
from lightning_compress.functional.sparsegpt import sparsegpt_prune, sparsegpt_reference
from lightning_compress.functional.wanda import wanda_mask


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated inputs X (2048 tokens, 128 features, uneven scales), a 64x128 weight and H = 2 XᵀX."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g)
    x = x * torch.linspace(0.2, 3.0, 128)[torch.randperm(128, generator=g)]
    return x, torch.randn(64, 128, generator=g), hessian_update(None, x)


def _out_err(x, w, q) -> float:
    return float((x.double() @ (w - q).double().T).norm())


CASES = [
    {"sparsity": 0.5},
    {"sparsity": 0.3, "options": GPTQOptions(block_size=40)},  # blocks of 40: a short last block
    {"nm": (2, 4)},
    {"nm": (1, 4), "options": GPTQOptions(block_size=32)},
    {"sparsity": 0.5, "quantize": True},
    {"nm": (2, 4), "quantize": True, "options": GPTQOptions(bits=3, symmetric=False, block_size=40)},
    {"nm": (2, 4), "quantize": True, "options": GPTQOptions(group_size=32, static_groups=True)},
]


@pytest.mark.parametrize("kwargs", CASES)
def test_fast_solver_matches_the_papers_algorithm(problem, kwargs):
    _, w, h = problem
    res, ref = sparsegpt_prune(w, h, **kwargs), sparsegpt_reference(w, h, **kwargs)
    assert (res.mask == ref.mask).double().mean() > 0.995  # float32 vs float64: rare ties fall apart
    torch.testing.assert_close(res.weight, ref.weight, rtol=0, atol=1e-3 if kwargs.get("quantize") else 1e-4)
    assert res.damp == pytest.approx(ref.damp)
    assert torch.all(res.weight[~res.mask] == 0)  # exact zeros where pruned
    if kwargs.get("quantize"):
        qmin, qmax = quant_range(kwargs.get("options", GPTQOptions()).bits)
        assert res.codes.min() >= qmin and res.codes.max() <= qmax
        assert torch.equal(dequantize(res.codes, res.scale, res.zero_point), res.weight)
        torch.testing.assert_close(res.scale, ref.scale)
    else:
        assert torch.all(res.weight[res.mask] != 0)  # a kept weight is never 0 here


@pytest.mark.parametrize(("kwargs", "fraction"), [({"sparsity": 0.5}, 0.5), ({"sparsity": 0.3}, 0.3)])
def test_unstructured_sparsity_is_exact_per_block(problem, kwargs, fraction):
    _, w, h = problem
    res = sparsegpt_prune(w, h, options=GPTQOptions(block_size=32), **kwargs)
    for i in range(0, 128, 32):
        assert (~res.mask[:, i : i + 32]).sum() == round(fraction * 64 * 32)


def test_nm_masks_do_not_depend_on_the_block_size(problem):
    _, w, h = problem
    results = [sparsegpt_prune(w, h, nm=(2, 4), options=GPTQOptions(block_size=b)) for b in (8, 40, 128)]
    for r in results[1:]:
        assert torch.equal(r.mask, results[0].mask)
        torch.testing.assert_close(r.weight, results[0].weight, rtol=0, atol=1e-4)
    assert torch.all(results[0].mask.reshape(64, -1, 4).sum(-1) == 2)


def test_white_inputs_prune_by_magnitude_without_compensation():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    res = sparsegpt_prune(w, torch.eye(64), nm=(2, 4))
    assert torch.equal(res.mask, nm_mask(w, 2, 4))
    assert torch.equal(res.weight, w * res.mask)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_compensation_beats_wanda_at_the_same_sparsity(problem, nm):
    x, w, h = problem
    sparse = sparsegpt_prune(w, h, 0.5, nm)
    wanda = w * wanda_mask(w, x.square().sum(0), 0.5, nm)
    assert _out_err(x, w, sparse.weight) < 0.95 * _out_err(x, w, wanda)  # 0.93 unstructured, 0.79 at 2:4 here


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"nm": (2, 3)}, "M=3 must divide in_features=128 and block_size=128"),
        ({"nm": (4, 4)}, "0 < N < M"),
        ({"options": GPTQOptions(act_order=True)}, "act_order=True is not offered with pruning"),
        ({"quantize": True, "options": GPTQOptions(group_size=32)}, "needs static_groups=True"),
    ],
)
def test_bad_arguments(problem, kwargs, match):
    _, w, h = problem
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(w, h, **kwargs)
    with pytest.raises(ValueError, match=match):
        sparsegpt_reference(w, h, **kwargs)
