"""Int8Conv2d: the reference path is the fake-quant conv exactly; oneDNN's int8 convolution is within 40 dB of it
(exact int32 accumulation with zero-point padding); a QAT CNN exports its convs, saves, loads and predicts as the
fake-quant model did."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.examples.models import ImageClassifier, SmallCNN
from lightning_compress.export.int8_conv import Int8Conv2d, conv_geometry
from lightning_compress.export.io import load_exported, read_manifest, save_exported
from lightning_compress.export.onednn import onednn_unsupported_reason
from lightning_compress.export.plan import export_for_inference
from lightning_compress.nn.fake_quant import ActQuantizer, FakeQuantConv2d, WeightQuantizer
from lightning_compress.nn.observers import MinMaxObserver
from lightning_compress.summary import compression_summary
from tests.conftest import sqnr_db

ONEDNN_REASON = onednn_unsupported_reason()
needs_onednn = pytest.mark.skipif(ONEDNN_REASON is not None, reason=f"oneDNN int8: {ONEDNN_REASON}")

CONVS = {
    "3x3 pad 1": {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1},
    "stride 2, groups 4": {"in_channels": 16, "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1,
                           "groups": 4},
    "5x5 same, no bias": {"in_channels": 3, "out_channels": 8, "kernel_size": 5, "padding": "same", "bias": False},
    "1x1 dilated 2x3": {"in_channels": 4, "out_channels": 4, "kernel_size": (2, 3), "dilation": 2, "padding": (1, 2)},
}  # fmt: skip


def _qat_conv(cfg: dict, lo: float, hi: float, weight_bits: int = 8) -> FakeQuantConv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg)
    fq = FakeQuantConv2d.from_module(
        conv, WeightQuantizer(conv.weight, bits=weight_bits), ActQuantizer(MinMaxObserver())
    )
    fq.weight_quantizer.convert(fq.weight)
    with torch.no_grad():
        fq.train()(torch.rand(4, cfg["in_channels"], 12, 12) * (hi - lo) + lo)  # the observer's range
    return fq.eval()


@pytest.mark.parametrize("cfg", list(CONVS))
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_reference_equals_the_fake_quant_conv(cfg, weight_bits):
    fq = _qat_conv(CONVS[cfg], -0.5, 3.5, weight_bits)  # asymmetric range: zero-point far from 0
    q = fq.quantized()
    assert abs(float(q.input.zero_point)) > 50
    layer = Int8Conv2d.from_quantized(q.weight, fq, q.input)
    x = torch.rand(2, CONVS[cfg]["in_channels"], 11, 13) * 4.5 - 1  # outside the range too: clipping
    with torch.no_grad():
        assert torch.equal(layer.reference(x), fq(x))
        layer.set_kernel("float")  # the same math in channels-last: float32 summation order only
        torch.testing.assert_close(layer(x), fq(x), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("cfg", list(CONVS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_conv_matches_reference(cfg, dtype):
    fq = _qat_conv(CONVS[cfg], -0.5, 3.5)
    q = fq.quantized()
    layer = Int8Conv2d.from_quantized(q.weight, fq, q.input)
    layer.set_kernel("onednn")
    x = (torch.rand(2, CONVS[cfg]["in_channels"], 11, 13) * 4.5 - 1).to(dtype)
    with torch.no_grad():
        y, ref = layer(x), layer.reference(x)
    assert y.dtype == dtype and y.shape == ref.shape
    assert sqnr_db(ref.float(), y.float()) >= (60 if dtype == torch.float32 else 40)


@needs_onednn
def test_onednn_conv_accumulates_exactly_with_zero_point_padding():
    """Codes in, integers out: conv(q - Z, W_q) with the padding at the real value 0 (code Z), exactly."""
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (6, 3, 3, 3), dtype=torch.int8)
    geometry = {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    layer = Int8Conv2d(
        codes, torch.ones(6), None, geometry, act_scale=torch.tensor(1.0), act_zero_point=torch.tensor(-37.0)
    )
    layer.set_kernel("onednn")
    q = torch.randint(-128, 128, (2, 3, 7, 5)).float()  # x = q - Z: on the grid, within range
    y = layer(q + 37)
    exact = F.conv2d((q + 37).double(), codes.double(), padding=1)
    assert torch.equal(y.double(), exact)


def test_bad_input_is_rejected_before_building():
    geometry = {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    codes = torch.zeros(4, 2, 3, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="act_scale is None"):
        Int8Conv2d(codes, torch.ones(4), None, geometry)
    with pytest.raises(TypeError, match="codes must be a 4-D int8"):
        Int8Conv2d(codes.float(), torch.ones(4), None, geometry, act_scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="does not fit codes"):
        Int8Conv2d(codes, torch.ones(4), None, {**geometry, "kernel_size": [5, 5]}, act_scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        conv_geometry(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        conv_geometry(nn.Conv2d(2, 2, 4, padding="same"))


def test_qat_cnn_exports_its_convs_and_predicts_as_the_fake_quant_model(qat_cnn, tmp_path):
    fq, x = qat_cnn
    model = export_for_inference(copy.deepcopy(fq), example_inputs=x[:64])
    assert isinstance(model.net[0], Int8Conv2d) and isinstance(model.net[2], Int8Conv2d)
    rows = {r.name: r for r in model.export_report.layers}
    assert rows["net.0"].layout == "int8 conv" and rows["net.0"].tokens == 64 * 8 * 8  # batch x positions
    with torch.no_grad():
        before, after = fq(x), model(x)
    agreement = float((before.argmax(1) == after.argmax(1)).float().mean())
    assert agreement >= 0.999, agreement  # 360 test digits: every prediction
    # The report counts what is stored: int8 codes, a float32 scale per channel, the bias, act scale and zero-point.
    row = next(r for r in compression_summary(model).rows if r.name == "net.2")
    assert row.bytes == 32 * 16 * 9 + 4 * (32 + 32 + 2)
    path = save_exported(model, tmp_path / "cnn")
    assert read_manifest(path)["layers"]["net.0"]["class"] == "Int8Conv2d"
    fresh = load_exported(path, ImageClassifier(SmallCNN()))
    assert fresh.net[0].kernel == model.net[0].kernel
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_weight_only_and_plain_convs_stay_float(qat_cnn):
    fq, x = qat_cnn
    plain = ImageClassifier(SmallCNN()).eval()
    model = export_for_inference(plain, weights="int8", tokens=16)
    assert type(model.net[0]) is nn.Conv2d  # no calibrated input range: a float conv
    assert {r.name for r in model.export_report.layers} == {"net.6", "net.8"}


def test_memory_preference_keeps_the_int8_conv_kernel(qat_cnn):
    fq, x = qat_cnn
    model = export_for_inference(copy.deepcopy(fq), example_inputs=x[:64], prefer="memory")
    expected = "onednn" if ONEDNN_REASON is None else "reference"  # never the dense float copy
    assert model.net[0].kernel == expected and model.net[2].kernel == expected
