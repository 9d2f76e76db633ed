"""Fake-quant layers the export does not replace (here convolutions left out with ``ignore``) keep their input
quantization, so the exported model computes what the QAT model did, on every kernel choice, through a save and a
load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress.examples.models import ImageClassifier, SmallCNN
from lightning_compress.export.io import load_exported, read_manifest, save_exported
from lightning_compress.export.kept import InputQuantizedConv2d, input_quantized
from lightning_compress.export.plan import export_for_inference
from lightning_compress.functional.quant import fake_quantize
from lightning_compress.nn.quantized import QuantizedInput

KEEP_CONVS = r"net\.[02]"  # the convs: not exported when ignored, so kept float with their input quantization


@pytest.mark.parametrize("prefer", ["speed", "reference"])
def test_kept_convs_quantize_their_input_as_the_qat_model_did(qat_cnn, prefer):
    fq, x = qat_cnn
    model = copy.deepcopy(fq)
    with torch.no_grad():
        before = fq(x)
        export_for_inference(model, example_inputs=x[:64], prefer=prefer, ignore=KEEP_CONVS)
        after = model(x)
    assert isinstance(model.net[0], InputQuantizedConv2d) and isinstance(model.net[2], InputQuantizedConv2d)
    # The convs alone are exact: the same float conv on the same quantize-dequantized input.
    conv_in = torch.rand(8, 16, 8, 8) * 3
    with torch.no_grad():
        assert torch.equal(model.net[2](conv_in), fq.net[2](conv_in))
        # dropping the input quantization (what the export did before) is a different model
        assert not torch.equal(model.net[2](conv_in), nn.Conv2d.forward(model.net[2], conv_in))
    # Whole model: equal up to the int32-vs-float accumulation of the exported Linears.
    assert torch.equal(before.argmax(1), after.argmax(1))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)


def test_kept_input_quantization_saves_loads_and_survives_a_dtype_change(qat_cnn, tmp_path):
    fq, x = qat_cnn
    model = export_for_inference(copy.deepcopy(fq), example_inputs=x[:64], ignore=KEEP_CONVS)
    path = save_exported(model, tmp_path / "exported")
    assert set(read_manifest(path)["inputs"]) == {"net.0", "net.2"}
    fresh = load_exported(path, ImageClassifier(SmallCNN()))
    assert isinstance(fresh.net[2], InputQuantizedConv2d)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    scale = fresh.net[2].act_scale.clone()
    fresh.to(torch.bfloat16)
    assert fresh.net[2].act_scale.dtype == torch.float32 and torch.equal(fresh.net[2].act_scale, scale)
    assert fresh.net[2].weight.dtype == torch.bfloat16


def test_input_quantized_layer_is_the_layer_on_the_fake_quantized_input():
    conv = nn.Conv2d(3, 4, 3)
    q = QuantizedInput(8, torch.tensor(0.05), torch.tensor(-3.0))
    kept = input_quantized("c", conv, q)
    x = torch.randn(2, 3, 6, 6)
    expected = conv(fake_quantize(x, q.scale, q.zero_point, 8))
    assert torch.equal(kept(x), expected) and kept.weight is conv.weight
    assert not hasattr(conv, "act_scale")  # the original layer is left as it was
    with pytest.raises(ValueError, match="input smoothing on a Conv2d; allowed: Linear layers only"):
        input_quantized("c", conv, QuantizedInput(8, None, None, torch.ones(3)))
    with pytest.raises(TypeError, match="is a ReLU; allowed: Linear, Conv1d"):
        input_quantized("r", nn.ReLU(), q)
