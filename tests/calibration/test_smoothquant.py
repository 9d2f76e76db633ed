"""SmoothQuant over whole models: mappings, running maxima, exact folds, explicit scales, outlier channels."""

import pytest
import torch
from torch import nn

from lightning_compress import SmoothQuantCalibrate
from lightning_compress.calibration.batches import call_model, relative_error
from lightning_compress.calibration.smoothquant import (
    activation_absmax,
    find_mappings,
    is_foldable_norm,
    scale_explicit,
    smooth_groups,
    smoothquant_model,
)
from lightning_compress.functional.smoothquant import smoothing_factors, weight_absmax
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.tiny_models import tiny_bert, tiny_llama, token_batches


class PreLNBlock(nn.Module):
    """x -> LayerNorm -> fc1 -> GELU -> fc2, the pre-LN MLP of OPT / GPT (residual left out); LN's gamma plants
    outlier channels 100x the rest in fc1's input, as SmoothQuant observes in LLM activations, while the outputs
    stay balanced between channels."""

    def __init__(self, width: int = 64, outliers: tuple[int, ...] = (3, 17, 40)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        with torch.no_grad():  # the outlier channels' weights are 100x smaller: every channel carries signal
            self.norm.weight[list(outliers)] = 100.0
            self.fc1.weight[:, list(outliers)] /= 100.0

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def _outputs(model, batches):
    with torch.no_grad():
        return [call_model(model, b) for b in batches]


def _error(model, batches, reference):
    out = _outputs(model, batches)
    return sum(relative_error(r, o) for o, r in zip(out, reference, strict=True)) / len(out)


def test_foldable_norms():
    assert is_foldable_norm(nn.LayerNorm(4))
    assert not is_foldable_norm(nn.LayerNorm(4, elementwise_affine=False))
    assert is_foldable_norm(tiny_llama().model.norm)
    assert not is_foldable_norm(nn.BatchNorm1d(4))


def test_activation_absmax_is_the_running_channel_max():
    model = PreLNBlock().eval()
    batches = [torch.randn(8, 64) for _ in range(3)]
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    groups = find_mappings(model, layers, batches[0])
    stats = activation_absmax(model, layers, groups, batches)
    ln = torch.cat([model.norm(b) for b in batches]).detach()
    torch.testing.assert_close(stats[0], ln.abs().amax(dim=0))


def test_mappings_found_automatically_for_pre_ln_blocks():
    model = PreLNBlock().eval()
    groups = find_mappings(model, {"fc1": model.fc1, "fc2": model.fc2}, torch.randn(2, 64))
    assert [(g.layers, g.producer) for g in groups] == [(["fc1"], "norm"), (["fc2"], None)]
    llama = tiny_llama().eval()
    layers = {n: m for n, m in llama.named_modules() if isinstance(m, nn.Linear)}
    groups = {tuple(g.layers): g.producer for g in find_mappings(llama, layers, token_batches(1)[0])}
    p = "model.layers.1."
    assert groups[(f"{p}self_attn.q_proj", f"{p}self_attn.k_proj", f"{p}self_attn.v_proj")] == f"{p}input_layernorm"
    assert groups[(f"{p}mlp.gate_proj", f"{p}mlp.up_proj")] == f"{p}post_attention_layernorm"


def test_regex_mappings_restrict_folding_and_unmatched_ones_are_errors():
    llama = tiny_llama().eval()
    layers = {n: m for n, m in llama.named_modules() if isinstance(m, nn.Linear)}
    only_attn = [(r".*input_layernorm", r".*self_attn\.[qkv]_proj")]
    groups = find_mappings(llama, layers, token_batches(1)[0], only_attn)
    assert {g.producer for g in groups if g.producer} == {f"model.layers.{i}.input_layernorm" for i in range(2)}
    with pytest.raises(ValueError, match="match no producer"):
        find_mappings(llama, layers, token_batches(1)[0], [(r".*input_layernorm", r".*mlp.*")])


@pytest.mark.parametrize("build", [PreLNBlock, tiny_llama, tiny_bert], ids=["pre_ln", "llama", "bert"])
def test_smoothing_alone_leaves_the_outputs_unchanged(build):
    model = build().eval()
    batches = [torch.randn(4, 8, 64)] * 2 if build is PreLNBlock else token_batches(2)
    reference = _outputs(model, batches)
    callback = SmoothQuantCalibrate(alpha=0.5, convert=False)
    callback.apply(model, batches)
    for m in model.modules():
        if is_fake_quant(m):
            m.enabled = False  # no rounding: only the (folded or explicit) smoothing remains
    assert _error(model, batches, reference) < 1e-5


def test_post_ln_bert_folds_are_rejected_for_explicit_scales():
    """BERT's LayerNorm output is also the residual stream: folding 1/s into it would change the model."""
    model = tiny_bert().eval()
    batches = token_batches(2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups = find_mappings(model, layers, batches[0])
    assert any(g.producer and "LayerNorm" in g.producer for g in groups)  # candidates exist ...
    stats = activation_absmax(model, layers, groups, batches)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "LayerNorm" in n}
    smoothing = smooth_groups(model, layers, groups, stats, lambda: call_model(model, batches[0]))
    assert all(s.explicit for s in smoothing)  # ... but every fold changed the outputs and was undone
    for group, sm in zip(groups, smoothing, strict=True):
        scale_explicit(layers, group, sm)  # what the walk does once a block is done; norms stay as they were
    for name, value in model.named_parameters():
        if name in norms:
            assert torch.equal(value, norms[name]), name


def test_smoothing_factors_in_the_model_are_the_formula():
    model = PreLNBlock().eval()
    batch = torch.randn(16, 64)
    act = model.norm(batch).detach().abs().amax(dim=0)
    expected = smoothing_factors(act, weight_absmax([model.fc1.weight]), 0.5)
    gamma = model.norm.weight.detach().clone()
    SmoothQuantCalibrate(alpha=0.5, convert=False).apply(model, [batch])
    torch.testing.assert_close(model.norm.weight.detach(), gamma / expected)


def _planted_errors(granularity):
    torch.manual_seed(0)
    batches, held_out = [torch.randn(16, 64) for _ in range(4)], [torch.randn(16, 64) for _ in range(4)]
    reference = _outputs(PreLNBlock().eval(), held_out)
    errors = []
    for alpha in (None, 0.5):
        model = PreLNBlock().eval()
        SmoothQuantCalibrate(alpha=alpha, act_granularity=granularity).apply(model, batches)
        errors.append(_error(model, held_out, reference))
    return errors


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_planted_outliers_smoothquant_w8a8_far_below_naive_w8a8(granularity):
    err_naive, err_smooth = _planted_errors(granularity)  # held-out relative output error vs FP32
    assert err_smooth < err_naive / 10, (err_smooth, err_naive)
    assert err_smooth < 0.05


def test_w8a8_layers_hold_int8_weights_and_activation_scales():
    model = PreLNBlock().eval()
    callback = SmoothQuantCalibrate(act_granularity="tensor")
    quantized = callback.apply(model, [torch.randn(8, 64)])
    for name in ("fc1", "fc2"):
        layer, state = model.get_submodule(name), quantized[name]
        assert is_fake_quant(layer) and state.weight.codes.dtype == torch.int8
        deq = state.weight.codes.float() * state.weight.scale
        torch.testing.assert_close(layer.weight.detach(), deq, atol=0, rtol=0)
        assert state.input.scale.dim() == 0 and state.input.scale > 0
    assert quantized["fc2"].input.smooth is not None and quantized["fc1"].input.smooth is None  # explicit; folded


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_each_block_is_measured_on_what_the_float_model_feeds_it(build):
    """Block by block, every group's max |X| is the one the untouched model's activations give (folds change the
    activations by float rounding only; explicit groups keep their weights until their block is done). Layers
    outside the stack (BERT's pooler) come after the blocks were quantized, and are left out here."""
    model, reference = build().eval(), build().eval()
    batches = token_batches(3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    ref_layers = {n: reference.get_submodule(n) for n in layers}
    groups = find_mappings(reference, ref_layers, batches[0])
    expected = dict(zip([tuple(g.layers) for g in groups], activation_absmax(reference, ref_layers, groups, batches),
                        strict=True))  # fmt: skip
    measured = []
    smoothquant_model(model, layers, batches, measured.extend, alpha=0.5)
    assert {tuple(g.group.layers) for g in measured} == set(expected)
    assert any(g.smoothing.explicit for g in measured)
    for g in measured:
        if g.group.layers[0].startswith(("model.layers.", "encoder.layer.")):
            torch.testing.assert_close(g.absmax, expected[tuple(g.group.layers)], rtol=1e-5, atol=1e-6)
