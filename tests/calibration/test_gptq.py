"""GPTQ over whole models: conv unfolding, true-sequential Hessians, transformer blocks, uncalled layers."""

import copy

import pytest
import torch
from torch import nn

from lightning_compress.calibration.batches import call_model, real_tokens
from lightning_compress.calibration.gptq import (
    PRUNED_MIN_SPARSITY,
    gptq_model,
    is_gptq_layer,
    layer_inputs,
    pruned_zeros,
    weight_matrix,
)
from lightning_compress.functional.gptq import GPTQOptions, gptq_quantize, hessian_update
from lightning_compress.nn.select import select_layers
from tests.calibration.reference import true_sequential_reference
from tests.tiny_models import tiny_bert, tiny_llama, token_batches


def test_conv_unfolding_reproduces_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 9, 9)
    rows = layer_inputs(conv, x) @ weight_matrix(conv).T + conv.bias  # (N·L, out)
    ref = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-5)


def test_which_layers_gptq_takes():
    assert is_gptq_layer(nn.Linear(2, 2)) and is_gptq_layer(nn.Conv2d(2, 2, 3))
    assert not is_gptq_layer(nn.Conv2d(4, 4, 3, groups=2))
    assert not is_gptq_layer(nn.Conv2d(2, 2, 3, padding="same"))
    assert not is_gptq_layer(nn.Conv1d(2, 2, 3))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_true_sequential_second_layer_sees_quantized_first_layer():
    model = _mlp()
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    torch.manual_seed(1)
    batches = [torch.randn(64, 16) @ torch.randn(16, 16) for _ in range(3)]  # correlated inputs
    h0 = None
    for b in batches:
        h0 = hessian_update(h0, b)
    results = gptq_model(model, {"0": model[0], "2": model[2]}, batches, GPTQOptions(bits=4))
    first = gptq_quantize(w0, h0, GPTQOptions(bits=4))
    assert torch.equal(results["0"].codes, first.codes)
    h2 = None  # the second layer's Hessian from the *quantized* first layer's outputs
    for b in batches:
        h2 = hessian_update(h2, torch.relu(b @ first.weight.T + model[0].bias.detach()))
    assert torch.equal(results["2"].codes, gptq_quantize(w2, h2, GPTQOptions(bits=4)).codes)
    torch.testing.assert_close(model[2].weight.detach(), results["2"].weight)


def test_blocks_are_calibrated_on_the_quantized_blocks_before_them():
    model = tiny_bert().eval()
    batches = token_batches(2)
    original = model.encoder.layer[1].attention.self.query.weight.detach().clone()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    results = gptq_model(model, layers, batches, GPTQOptions(bits=4))
    assert set(results) == set(layers)
    h, mask = None, None  # block 1's input at the real (not padding) tokens, produced by the now-quantized model

    def grab(_, args, kwargs):
        nonlocal h
        h = hessian_update(h, real_tokens(args[0] if args else kwargs["hidden_states"], mask))

    handle = model.encoder.layer[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"].bool()
            call_model(model, b)
    handle.remove()
    expected = gptq_quantize(original, h, GPTQOptions(bits=4))
    assert torch.equal(results["encoder.layer.1.attention.self.query"].codes, expected.codes)


def test_a_layer_never_called_is_rounded_to_nearest_with_a_warning():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    w = model.unused.weight.detach().clone()
    with pytest.warns(UserWarning, match="unused.*no calibration input"):
        results = gptq_model(
            model, {"used": model.used, "unused": model.unused}, [torch.randn(4, 8)], GPTQOptions(bits=4)
        )
    rtn = gptq_quantize(w, torch.eye(8, dtype=torch.float64), GPTQOptions(bits=4))
    assert torch.equal(results["unused"].codes, rtn.codes)


def test_gptq_model_restores_train_mode():
    model = _mlp().train()
    gptq_model(model, {"0": model[0]}, [torch.randn(4, 16)], GPTQOptions(bits=8))
    assert model.training and model[0].training


@pytest.mark.parametrize("options", [GPTQOptions(bits=4, symmetric=False), GPTQOptions(bits=3, act_order=True)])
def test_gptq_on_a_llama_is_the_reference_scripts_true_sequential_walk(options):
    """Pins the walk of Frantar et al.'s llama.py (sequential block outputs, q/k/v → o → gate/up → down, Hessians
    of real tokens, lm_head left out) on a small Llama-style model."""
    model, batches = tiny_llama().eval(), token_batches(3)
    reference = copy.deepcopy(model)

    def solve(name, layer, hessian):
        result = gptq_quantize(layer.weight, hessian, options)
        layer.weight.copy_(result.weight)
        return result

    expected = true_sequential_reference(reference, batches, solve)
    layers = select_layers(model)
    assert sorted(layers) == sorted(expected)  # every Linear of the blocks, not lm_head
    results = gptq_model(model, layers, batches, options)
    for name, result in results.items():
        assert (result.codes == expected[name].codes).double().mean() > 0.99, name  # float32 near-ties only
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, reference(**batches[0]).logits, rtol=0, atol=5e-3)


def test_zeros_are_kept_in_pruned_layers_only(monkeypatch):
    # a few zeros by chance (a dense layer) are free to move; from PRUNED_MIN_SPARSITY on, every zero stays
    import lightning_compress.calibration.gptq as module

    held = []
    solve = module.gptq_quantize
    monkeypatch.setattr(module, "gptq_quantize", lambda *a, keep, **k: held.append(keep) or solve(*a, keep=keep, **k))
    model, batches = tiny_llama().eval(), token_batches(2)
    chance, pruned = model.model.layers[0].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        chance.view(-1)[::1000] = 0.0  # 0.1%
        pruned.view(-1)[: int(PRUNED_MIN_SPARSITY * pruned.numel()) + 1] = 0.0
    assert pruned_zeros(chance) is None and bool(pruned_zeros(pruned).sum() > 0)
    zeros_pruned = pruned == 0
    layers = {n: m for n, m in select_layers(model).items() if n.endswith("down_proj")}
    gptq_model(model, layers, batches, GPTQOptions(bits=4, symmetric=False))
    assert bool((pruned[zeros_pruned] == 0).all())
    assert held[0] is None and torch.equal(held[1], ~zeros_pruned)  # the dense layer solved as if it had no zeros
