"""WandaPrune on a Llama-style decoder: block-sequential as Sun et al. run it (checked against whole-model passes),
exact N:M zeros that export as 2:4 layers, bad input refused before any weight changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress import WandaPrune
from lightning_compress.export.plan import export_for_inference
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.functional.wanda import wanda_mask
from tests.calibration.reference import LLAMA_GROUPS, true_sequential_reference
from tests.tiny_models import tiny_llama, token_batches


def _reference(model: nn.Module, batches, sparsity, nm) -> dict[str, torch.Tensor]:
    """Block i's Linears scored by hooks on whole-model forwards, after blocks 0..i-1 were pruned (one group per
    block: ``Σ_t x_tj² = diag(H) / 2``)."""

    def solve(name, layer, hessian):
        mask = wanda_mask(layer.weight, hessian.diagonal() / 2, sparsity, nm)
        layer.weight.masked_fill_(~mask, 0.0)
        return mask

    return true_sequential_reference(model, batches, solve, [[n for g in LLAMA_GROUPS for n in g]])


@pytest.mark.parametrize(("kwargs", "nm"), [({"sparsity": 0.5}, None), ({"pattern": "2:4"}, (2, 4))])
def test_wanda_is_block_sequential_and_leaves_exact_zeros(kwargs, nm):
    model, batches = tiny_llama().eval(), token_batches(3)
    expected = _reference(copy.deepcopy(model), batches, 0.5, nm)
    head = model.lm_head.weight.clone()
    masks = WandaPrune(**kwargs).apply(model, batches)
    assert sorted(masks) == sorted(expected) and "lm_head" not in masks
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
        w = model.get_submodule(name).weight
        assert torch.equal(w != 0, mask)  # zero exactly where pruned (no surviving weight is 0 here)
        if nm is not None:
            assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2)
    assert torch.equal(model.lm_head.weight, head)


def test_a_wanda_24_model_exports_as_sparse_layers():
    model, batches = tiny_llama().eval(), token_batches(2)
    WandaPrune(pattern="2:4").apply(model, batches)
    export_for_inference(model, tokens=16)
    kinds = {type(m) for n, m in model.named_modules() if n.startswith("model.layers.")}
    assert SemiStructuredSparseLinear in kinds and not any(type(m) is nn.Linear for m in model.model.layers.modules())


def test_bad_input_is_refused_before_any_weight_changes():
    model = tiny_llama().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"input width 32 is not divisible by M=3 \(pattern '2:3'\)"):
        WandaPrune(pattern="2:3").apply(model, token_batches(1))
    with pytest.raises(ValueError, match="N:M fixes the sparsity at 0.5"):
        WandaPrune(sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        WandaPrune(sparsity=1.0)
    with pytest.raises(ValueError, match="batches is empty"):
        WandaPrune().apply(model, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
