"""SparseGPTPrune on a Llama-style decoder: the true-sequential walk of the reference script (checked against
whole-model passes), exact zeros that export as 2:4 layers, joint 2:4 + int4 (exported as int4), bad input refused
before any change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress import GPTQFinalize, SparseGPTPrune
from lightning_compress.export.int4_linear import Int4Linear
from lightning_compress.export.plan import export_for_inference
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.functional.gptq import GPTQOptions, gptq_quantize_reference
from lightning_compress.functional.sparsegpt import sparsegpt_prune
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.calibration.reference import true_sequential_reference
from tests.tiny_models import tiny_llama, token_batches


def _reference(model, batches, sparsity, nm, options=None, quantize=False):
    def solve(name, layer, hessian):
        result = sparsegpt_prune(layer.weight, hessian, sparsity, nm, options, quantize)
        layer.weight.copy_(result.weight)
        return result

    return true_sequential_reference(model, batches, solve)


@pytest.mark.parametrize(("kwargs", "nm"), [({"sparsity": 0.5}, None), ({"pattern": "2:4"}, (2, 4))])
def test_sparsegpt_is_true_sequential_and_leaves_exact_zeros(kwargs, nm):
    model, batches = tiny_llama().eval(), token_batches(3)
    reference = copy.deepcopy(model)
    expected = _reference(reference, batches, 0.5, nm)
    head = model.lm_head.weight.clone()
    masks = SparseGPTPrune(**kwargs).apply(model, batches)
    assert sorted(masks) == sorted(expected) and "lm_head" not in masks
    for name, mask in masks.items():
        agree = (mask == expected[name].mask).double().mean()
        assert agree > 0.99, name  # Hessians summed in another order: float32 near-ties may fall apart
        w = model.get_submodule(name).weight
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] != 0), name
        if nm is not None:
            assert torch.all(mask.reshape(w.shape[0], -1, 4).sum(-1) == 2)
    assert torch.equal(model.lm_head.weight, head)
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, reference(**x).logits, rtol=0, atol=2e-3)


def test_joint_24_and_int4_in_one_pass_then_exported_as_24_layers():
    model, batches = tiny_llama().eval(), token_batches(2)
    callback = SparseGPTPrune(pattern="2:4", bits=4, symmetric=False)
    masks = callback.apply(model, batches)
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    assert is_fake_quant(layer) and sorted(callback.quantized) == sorted(masks)
    q = callback.quantized[name].weight
    assert q.bits == 4 and q.zero_point is not None and torch.all(layer.weight[~masks[name]] == 0)
    reference = copy.deepcopy(tiny_llama().eval())
    expected = _reference(reference, batches, 0.5, (2, 4), GPTQOptions(bits=4, symmetric=False), quantize=True)
    assert (q.codes == expected[name].codes).double().mean() > 0.99
    with torch.no_grad():
        fake_quant = model(**batches[0]).logits
        export_for_inference(model, tokens=16)  # int4 layers (no 2:4 + int4 kernel): the zeros are int4 codes
        assert isinstance(model.get_submodule(name), Int4Linear)
        torch.testing.assert_close(model(**batches[0]).logits, fake_quant, rtol=0, atol=1e-4)


def test_gptq_after_sparsegpt_keeps_every_pruned_weight_at_zero():
    # the two-pass route (prune, then GPTQ with its own Hessians on the pruned model): GPTQ compensates the
    # quantization error through the kept weights only, so the model stays 2:4
    model, batches = tiny_llama().eval(), token_batches(2)
    masks = SparseGPTPrune(pattern="2:4").apply(model, batches)
    pruned = copy.deepcopy(model)
    gptq = GPTQFinalize(bits=4)
    gptq.apply(model, batches)

    def solve(name, layer, hessian):
        result = gptq_quantize_reference(layer.weight, hessian, gptq.options, keep=layer.weight != 0)
        layer.weight.copy_(result.weight)
        return result

    expected = true_sequential_reference(pruned, batches, solve)
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        assert bool((weight[~keep] == 0).all()) and bool((weight[keep] != 0).float().mean() > 0.9), name
        assert (gptq.quantized[name].weight.codes == expected[name].codes).double().mean() > 0.99, name


def test_a_sparsegpt_24_model_exports_as_sparse_layers():
    model, batches = tiny_llama().eval(), token_batches(2)
    SparseGPTPrune(pattern="2:4").apply(model, batches)
    export_for_inference(model, tokens=16)
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    assert any(isinstance(m, SemiStructuredSparseLinear) for m in model.model.layers.modules())


def test_bad_input_is_refused_before_any_weight_changes():
    model = tiny_llama().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"input width 32 is not divisible by M=3 \(pattern '2:3'\)"):
        SparseGPTPrune(pattern="2:3", block_size=129).apply(model, token_batches(1))
    with pytest.raises(ValueError, match="block_size=130 must be a multiple of M=4"):
        SparseGPTPrune(pattern="2:4", block_size=130)
    with pytest.raises(ValueError, match="need bits"):
        SparseGPTPrune(group_size=16)
    with pytest.raises(ValueError, match="group_size=24 does not divide its input width 32"):
        SparseGPTPrune(bits=4, group_size=24).apply(model, token_batches(1))
    with pytest.raises(ValueError, match="N:M fixes the sparsity at 0.5"):
        SparseGPTPrune(sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match="batches is empty"):
        SparseGPTPrune().apply(model, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_failure_midway_restores_every_weight(monkeypatch):
    import lightning_compress.calibration.sparsegpt as module

    model, batches = tiny_llama().eval(), token_batches(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return sparsegpt_prune(*args, **kwargs)

    monkeypatch.setattr(module, "sparsegpt_prune", failing)
    with pytest.raises(RuntimeError, match="boom"):
        SparseGPTPrune(pattern="2:4").apply(model, batches)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
