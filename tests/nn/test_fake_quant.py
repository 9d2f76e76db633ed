import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional.quant import compute_qparams, dequantize, fake_quantize, quantize
from lightning_compress.nn.fake_quant import (
    ActQuantizer,
    FakeQuantConv2d,
    FakeQuantLinear,
    WeightQuantizer,
    fake_quant_class,
)
from lightning_compress.nn.observers import MinMaxObserver
from lightning_compress.nn.quantized import QuantizedWeight


def make_linear(**kwargs):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    return layer, FakeQuantLinear.from_module(layer, WeightQuantizer(layer.weight, **kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lsq": True}, {"method": "kmeans", "bits": 3}, {"group_size": 4, "symmetric": False}],
)
def test_swap_reuses_parameters_and_keeps_state_dict_keys(kwargs):
    layer, fq = make_linear(**kwargs)
    assert fq.weight is layer.weight and fq.bias is layer.bias
    assert list(fq.state_dict()) == ["weight", "bias"]
    nn.Linear(16, 8).load_state_dict(fq.state_dict(), strict=True)
    fq.load_state_dict(layer.state_dict(), strict=True)  # and the plain checkpoint loads into the swapped layer
    plain = fq.to_module()
    assert type(plain) is nn.Linear and plain.weight is layer.weight
    assert not hasattr(plain, "weight_quantizer")


def test_to_module_restores_the_original_subclass():
    mha = nn.MultiheadAttention(8, 2)
    out = mha.out_proj
    fq = fake_quant_class(out).from_module(out, WeightQuantizer(out.weight))
    assert isinstance(fq, FakeQuantLinear)
    assert type(fq.to_module()) is type(out)


def test_linear_forward_is_exactly_the_fake_quantized_matmul():
    layer, fq = make_linear(bits=4)
    x = torch.randn(5, 16)
    scale, zp = compute_qparams(layer.weight, 4, axis=0)
    assert torch.equal(fq(x), F.linear(x, fake_quantize(layer.weight, scale, zp, 4), layer.bias))


def test_conv_forward_and_activation_quantization():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    obs = MinMaxObserver()
    fq = FakeQuantConv2d.from_module(conv, WeightQuantizer(conv.weight, bits=8), ActQuantizer(obs, bits=8))
    x = torch.randn(2, 4, 5, 5)
    y = fq(x)
    s, z = compute_qparams(x, 8, symmetric=False)
    ws, wz = compute_qparams(conv.weight, 8, axis=0)
    expected = F.conv2d(fake_quantize(x, s, z, 8), fake_quantize(conv.weight, ws, wz, 8), conv.bias, padding=1)
    assert torch.equal(y, expected)
    assert obs.min_val.item() == x.min().item() and obs.max_val.item() == x.max().item()


def test_ste_gradients_reach_weights_and_lsq_scales():
    layer, fq = make_linear(bits=4, lsq=True)
    fq(torch.randn(3, 16)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    scale = fq.weight_quantizer.scale
    assert scale.grad is not None and (scale.grad != 0).any()
    assert any(p is scale for p in fq.parameters())  # the optimizer sees it


@pytest.mark.parametrize("kwargs", [{"bits": 8}, {"bits": 3, "symmetric": False, "group_size": 8}, {"lsq": True}])
def test_convert_puts_weights_exactly_on_grid(kwargs):
    layer, fq = make_linear(**kwargs)
    x = torch.randn(4, 16)
    before = fq(x)
    out = fq.weight_quantizer.convert(layer.weight)
    q, s, z = out.codes, out.scale, torch.zeros_like(out.scale) if out.zero_point is None else out.zero_point
    assert q.dtype == torch.int8
    assert torch.equal(dequantize(q, s, z), layer.weight)
    assert torch.equal(quantize(layer.weight, s, z, fq.weight_quantizer.bits), q)
    assert torch.equal(fq(x), before)  # fake-quant of an on-grid weight changes nothing


def test_kmeans_weights_share_centroids_and_centroid_grads_sum_members():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.05] = 0  # some pruned weights
    zeros = layer.weight == 0
    fq = FakeQuantLinear.from_module(layer, WeightQuantizer(layer.weight, bits=3, method="kmeans"))
    x = torch.randn(6, 32)
    upstream = torch.randn(6, 16)
    fq(x).backward(upstream)
    wq = fq.weight_quantizer
    w_eff = wq(layer.weight)
    assert torch.all(w_eff[zeros] == 0)
    assert len(torch.unique(w_eff[~zeros])) <= 8
    grad_w = upstream.t() @ x  # dL/dW_eff
    expected = torch.zeros(8).index_add_(0, wq.indices[~zeros], grad_w[~zeros])
    assert torch.allclose(wq.centroids.grad, expected, atol=1e-5)
    assert layer.weight.grad is None  # shared weights train only through their centroids


def test_bad_weight_quantizer_arguments():
    w = torch.randn(8, 9)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\], got 9"):
        WeightQuantizer(w, bits=9)
    with pytest.raises(ValueError, match="group_size=4 does not divide the input dimension 9"):
        WeightQuantizer(w, group_size=4)
    with pytest.raises(ValueError, match="lsq=True needs method='linear'"):
        WeightQuantizer(w, lsq=True, method="kmeans", bits=3)
    with pytest.raises(TypeError, match="Embedding has no fake-quant version"):
        fake_quant_class(nn.Embedding(3, 4))


@pytest.mark.parametrize("group_size", [None, 8])
def test_lsq_from_a_ptq_grid_starts_exactly_there_learns_its_scales_and_keeps_its_zero_points(group_size):
    torch.manual_seed(0)
    w = torch.randn(6, 16) + 0.3
    scale, zero = compute_qparams(w, 3, symmetric=False, axis=None if group_size else 0, group_size=group_size)
    start = QuantizedWeight(quantize(w, scale * 0.9, zero, 3), scale * 0.9, zero, 3, group_size)
    weight = nn.Parameter(start.dequantize())  # a PTQ result: the weight sits on its grid
    wq = WeightQuantizer.from_quantized(weight, start, lsq=True)
    assert torch.equal(wq(weight), start.dequantize())
    (wq(weight) * torch.randn(6, 16)).sum().backward()
    assert wq.scale.grad is not None and (wq.scale.grad != 0).any() and weight.grad is not None
    with torch.no_grad():
        wq.scale.mul_(1.1)
    converted = wq.convert(weight)
    assert torch.equal(converted.zero_point, zero) and torch.allclose(converted.scale, scale * 0.99)
    assert torch.equal(weight.detach(), converted.dequantize())
    restored = WeightQuantizer(weight, 3, False, group_size, lsq=True)
    restored.load_quant_state(wq.quant_state())
    assert torch.equal(restored.qparams(weight).zero_point, zero)


def test_lsq_cannot_start_from_per_column_act_order_scales():
    w = torch.randn(4, 8)
    scale, zero = torch.rand(4, 8) + 0.1, torch.zeros(4, 8)
    start = QuantizedWeight(quantize(w, scale, zero, 4), scale, zero, 4)
    with pytest.raises(ValueError, match="static_groups=True"):
        WeightQuantizer.from_quantized(nn.Parameter(start.dequantize()), start, lsq=True)
