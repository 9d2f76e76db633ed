"""AWQCalibrate on a Llama-style decoder: exact folds (norms, and up_proj for down_proj), the α the search picks is
the best on the attention's output, AWQ beats round-to-nearest, AWQ + GPTQ compose, bad input refused first."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_compress import AWQCalibrate, GPTQFinalize
from lightning_compress.functional.awq import awq_factors, fake_quant_weight, scaled_fake_quant
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.tiny_models import tiny_llama, token_batches


def _rel(model, reference, batch) -> float:
    with torch.no_grad():
        a, b = model(**batch).logits, reference(**batch).logits
    return float((a - b).norm() / b.norm())


def test_scales_fold_exactly_into_norms_and_up_proj():
    model, batches = tiny_llama().eval(), token_batches(3)
    reference = copy.deepcopy(model)
    callback = AWQCalibrate(bits=4, clip=False, quantize=False)
    assert callback.apply(model, batches) == {}
    producers = {tuple(g.layers): g.producer for g in callback.groups}
    block = "model.layers.1"
    assert producers[tuple(f"{block}.self_attn.{p}_proj" for p in "qkv")] == f"{block}.input_layernorm"
    assert producers[(f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj")] == f"{block}.post_attention_layernorm"
    assert producers[(f"{block}.mlp.down_proj",)] == f"{block}.mlp.up_proj"  # down reads act(gate) · up
    assert producers[(f"{block}.self_attn.o_proj",)] is None  # GQA: v_proj's 16 outputs are not o_proj's 32 inputs
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight)
    assert _rel(model, reference, batches[0]) < 1e-5  # an equivalence: the float model computes the same


def test_the_chosen_alpha_is_the_best_on_the_attention_output():
    model, batches = tiny_llama().eval(), token_batches(2)
    reference = copy.deepcopy(model)
    callback = AWQCalibrate(bits=3, clip=False, quantize=False, max_search_tokens=10_000)
    callback.apply(model, batches)
    chosen = callback.groups[0]  # block 0's q/k/v
    attn = reference.model.layers[0].self_attn
    calls, acts = [], []
    h1 = attn.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    h2 = attn.q_proj.register_forward_pre_hook(
        lambda m, a: acts.append(a[0][batches[len(acts)]["attention_mask"].bool()])
    )
    with torch.no_grad():
        for b in batches:
            reference(**b, use_cache=False)
    h1.remove(), h2.remove()
    act_mean = torch.cat(acts).abs().mean(0)
    original = {p: getattr(attn, f"{p}_proj").weight.detach().clone() for p in "qkv"}
    with torch.no_grad():
        outputs = [attn(**k)[0] for k in calls]
        errors = []
        for i in range(20):
            s = awq_factors(act_mean, i / 20)
            for p in "qkv":
                getattr(attn, f"{p}_proj").weight.copy_(scaled_fake_quant(original[p], s, 3, None, False))
            errors.append(sum(float((attn(**k)[0] - o).square().mean()) for k, o in zip(calls, outputs, strict=True)))
    assert chosen.alpha == pytest.approx(min(range(20), key=errors.__getitem__) / 20)


def test_awq_beats_round_to_nearest_and_composes_with_gptq():
    reference, batches = tiny_llama().eval(), token_batches(3)
    rtn = copy.deepcopy(reference)
    with torch.no_grad():
        for block in rtn.model.layers:
            for layer in [m for m in block.modules() if isinstance(m, torch.nn.Linear)]:
                layer.weight.copy_(fake_quant_weight(layer.weight, 3, None, False))
    awq = copy.deepcopy(reference)
    quantized = AWQCalibrate(bits=3).apply(awq, batches)
    layer = awq.get_submodule("model.layers.0.mlp.down_proj")
    assert is_fake_quant(layer) and quantized["model.layers.0.mlp.down_proj"].weight.bits == 3
    assert _rel(awq, reference, batches[0]) < 0.95 * _rel(rtn, reference, batches[0])
    both = copy.deepcopy(reference)
    AWQCalibrate(bits=3, quantize=False).apply(both, batches)
    GPTQFinalize(bits=3, symmetric=False).apply(both, batches)
    assert is_fake_quant(both.get_submodule("model.layers.1.self_attn.q_proj"))
    assert _rel(both, reference, batches[0]) < _rel(rtn, reference, batches[0])


def test_bad_input_is_refused_before_any_weight_changes(monkeypatch):
    model = tiny_llama().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="group_size=24 does not divide its input width 32"):
        AWQCalibrate(group_size=24).apply(model, token_batches(1))
    with pytest.raises(ValueError, match="grid must be a positive int"):
        AWQCalibrate(grid=0)
    with pytest.raises(ValueError, match="bits"):
        AWQCalibrate(bits=1)
    with pytest.raises(ValueError, match="batches is empty"):
        AWQCalibrate().apply(model, [])
    with pytest.raises(ValueError, match=r"clip must be a bool \(True or False\) or None \(= quantize\), got 'yes'"):
        AWQCalibrate(clip="yes")
    # AWQ's clipping search runs when AWQ rounds; before GPTQ (quantize=False) GPTQ's own search sets the ranges
    assert AWQCalibrate().clip and not AWQCalibrate(quantize=False).clip
    assert AWQCalibrate(quantize=False, clip=True).clip
    import lightning_compress.calibration.awq as module

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = module.clip_ratios
    monkeypatch.setattr(module, "clip_ratios", failing)
    with pytest.raises(RuntimeError, match="boom"):
        AWQCalibrate().apply(model, token_batches(1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
