import pytest
import torch
from torch import nn

from lightning_compress.functional.size import TensorFormat
from lightning_compress.summary import compression_summary


def test_dense_fp32_model_is_ratio_one_and_counts_every_parameter():
    model = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    s = compression_summary(model)
    assert [r.name for r in s.rows] == ["0", "1", "2"]
    assert s.params == sum(p.numel() for p in model.parameters()) == 36 + 8 + 8
    assert s.bytes == s.fp32_bytes == 4 * s.params
    assert s.ratio == 1.0


def test_sparsity_is_counted_from_the_weights():
    layer = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        layer.weight[:, :7] = 0
    s = compression_summary(nn.Sequential(layer))
    assert s.rows[0].nonzero == 30
    assert s.sparsity == pytest.approx(0.7)
    assert s.bytes == (30 * 32 + 100) / 8  # 30 FP32 values + a 100-bit mask


def test_declared_weight_format_sets_bits_and_bytes():
    layer = nn.Linear(16, 4)
    layer.weight_format = TensorFormat(bits=4, n_scales=4)
    s = compression_summary(nn.Sequential(layer))
    row = s.rows[0]
    assert row.bits == 4
    assert row.bytes == (64 * 4 + 4 * 32 + 4 * 32) / 8  # int4 weight + 4 scales + FP32 bias
    assert s.ratio == pytest.approx((68 * 32) / (64 * 4 + 4 * 32 + 4 * 32))
    assert "**total**" in s.to_markdown()


def _kmeans_model():
    from lightning_compress.nn.fake_quant import FakeQuantLinear, WeightQuantizer

    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.08] = 0
    fq = FakeQuantLinear.from_module(layer, WeightQuantizer(layer.weight, bits=4, method="kmeans"))
    with torch.no_grad():
        fq.weight_quantizer.convert(fq.weight)
    return nn.Sequential(fq)


def test_quantizer_state_is_not_counted_twice():
    model = _kmeans_model()
    s = compression_summary(model)
    assert [r.name for r in s.rows] == ["0"]  # the codebook lives in the layer's format, not as a row
    row = s.rows[0]
    assert row.params == 64 * 16 + 16 and row.bits == 4
    nnz = int(torch.count_nonzero(model[0].weight))
    assert row.bytes == (min(1024 * 4, nnz * 4 + 1024) + 16 * 32 + 16 * 32) / 8


def test_stage_sizes_follow_deep_compression_per_layer():
    from lightning_compress.functional.kmeans import deep_compression_bits
    from lightning_compress.summary import stage_sizes

    model = _kmeans_model()
    bits = deep_compression_bits(model[0].weight.detach(), k=16, index_bits=5)
    sizes = stage_sizes(model)
    bias = 16 * 4
    assert sizes == {stage: bits[stage] / 8 + bias for stage in ("dense", "pruned", "kmeans", "huffman")}
    assert sizes["dense"] > sizes["pruned"] > sizes["kmeans"] > sizes["huffman"]


def test_an_exported_model_counts_what_is_stored_float_layers_dense_whatever_their_zeros():
    """A 2:4-pruned conv left float by the export is stored densely: the summary's bytes are the stored bytes."""
    from lightning_compress.examples.models import SmallCNN
    from lightning_compress.export.plan import export_for_inference
    from lightning_compress.functional.masks import nm_mask

    model = SmallCNN(width=16).eval()
    with torch.no_grad():
        conv = model[2]  # 16 -> 32 channels, 3×3: 2:4 along its inputs, as IterativePruning(method="nm") prunes
        conv.weight.mul_(nm_mask(conv.weight, 2, 4))
    before = next(r for r in compression_summary(model).rows if r.name == "2")
    assert before.pattern == "2:4" and before.bytes < conv.weight.numel() * 4  # as an export could store it
    export_for_inference(model, weights="int8", tokens=8)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    summary = compression_summary(model)
    assert summary.bytes == stored
    assert next(r for r in summary.rows if r.name == "2").bytes == conv.weight.numel() * 4 + conv.bias.numel() * 4


def test_weights_that_round_to_zero_are_not_counted_as_pruned():
    from lightning_compress.nn.fake_quant import FakeQuantLinear, WeightQuantizer

    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        layer.weight[:, :16] = 0  # a quarter pruned
    fq = FakeQuantLinear.from_module(layer, WeightQuantizer(layer.weight, bits=2))
    fq.weight_quantizer.convert(fq.weight)
    zeros = float((fq.weight == 0).float().mean())
    assert zeros > 0.3  # 2-bit rounding put many more weights on code 0
    row = compression_summary(nn.Sequential(fq)).rows[0]
    assert row.sparsity == 0.25 and row.pattern == "unstructured"
    plain = FakeQuantLinear.from_module(nn.Linear(64, 32, bias=False), WeightQuantizer(torch.randn(32, 64), bits=2))
    plain.weight_quantizer.convert(plain.weight)
    assert compression_summary(nn.Sequential(plain)).rows[0].sparsity == 0.0  # QAT alone prunes nothing
