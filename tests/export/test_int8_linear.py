"""Int8Linear: the reference path equals the fake-quant layers exactly; the _int_mm and oneDNN paths are within 40 dB
of it, with exact integer accumulation."""

import pytest
import torch
from torch import nn

from lightning_compress.export.int8_linear import Int8Linear, compile_w8a8, int_mm_ok, w8a8_linear
from lightning_compress.export.layer import SMALL_ROWS
from lightning_compress.export.onednn import (
    KERNEL_ROWS,
    U8_SHIFT,
    onednn_unsupported_reason,
    prepack_linear,
    qlinear,
    shift_u8,
)
from lightning_compress.functional.quant import compute_qparams, quantize
from lightning_compress.nn.fake_quant import ActQuantizer, FakeQuantLinear, SymmetricActQuantizer, WeightQuantizer
from lightning_compress.nn.observers import MinMaxObserver
from tests.conftest import sqnr_db


def _fake_quant(lin: nn.Linear, act: nn.Module | None) -> FakeQuantLinear:
    layer = FakeQuantLinear.from_module(lin, WeightQuantizer(lin.weight, bits=8), act)
    layer.weight_quantizer.convert(layer.weight)
    return layer.eval()


def _int8_of(layer: FakeQuantLinear, **act) -> Int8Linear:
    s, z = layer.weight_quantizer.frozen
    return Int8Linear(quantize(layer.weight.detach(), s, z, 8), s, layer.bias, **act)


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("smooth", [False, True])
def test_reference_equals_smoothquant_fake_quant_layer(granularity, smooth):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    div = torch.rand(48) + 0.5 if smooth else None
    scale = torch.tensor(0.02) if granularity == "tensor" else None
    fq = _fake_quant(lin, SymmetricActQuantizer(8, granularity, scale=scale, smooth=div))
    exported = _int8_of(fq, act_scale=scale, smooth=div)
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        assert torch.equal(exported.reference(x), fq(x))


def test_reference_equals_qat_layer_with_asymmetric_static_activations():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    act = ActQuantizer(MinMaxObserver(), bits=8)
    fq = _fake_quant(lin, act).train()
    with torch.no_grad():
        fq(torch.randn(64, 32) * 2 + 1)  # the observer sees a shifted range: a non-zero zero-point
        fq.eval()
        s, z = act.observer.qparams(8, symmetric=False)
        assert float(z) != 0
        exported = _int8_of(fq, act_scale=s, act_zero_point=z)
        x = torch.randn(7, 32) * 2 + 1
        assert torch.equal(exported.reference(x), fq(x))
        exported.set_kernel("int8")
        assert sqnr_db(exported.reference(x), exported(x)) >= 40  # zero-point correction: Z · colsum(W)


def _forward(layer: Int8Linear, x: torch.Tensor, compiled: bool) -> torch.Tensor:
    """``layer(x)`` with the W8A8 paths compiled or eager."""
    compile_w8a8(compiled)
    try:
        return layer(x)
    finally:
        compile_w8a8(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [True, False])
def test_int8_kernel_matches_reference(dtype, compiled):
    torch.manual_seed(0)
    layer = Int8Linear.from_module(nn.Linear(64, 40))
    layer.set_kernel("int8")
    x = torch.randn(2, 9, 64, dtype=dtype)
    y = _forward(layer, x, compiled)
    assert y.shape == (2, 9, 40) and y.dtype == dtype
    assert sqnr_db(layer.reference(x).float(), y.float()) >= (60 if dtype == torch.float32 else 40)


def test_integer_accumulation_is_exact():
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (16, 24), dtype=torch.int8)
    x = torch.randint(-127, 128, (5, 24)).float()  # already integers with max |x| = 127 per token: scale 1
    x[:, 0] = 127
    y = w8a8_linear(x, codes.t().contiguous(), torch.ones(16), None, 8)
    assert torch.equal(y, (x @ codes.float().t()))


def test_float_kernel_and_from_module():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    layer = Int8Linear.from_module(lin)
    s, z = compute_qparams(lin.weight.detach(), 8, axis=0)
    assert torch.equal(layer.weight_t.t(), quantize(lin.weight.detach(), s, z, 8))
    layer.set_kernel("float")
    x = torch.randn(4, 32)
    # the float kernel computes the layer's own function: the input fake-quantized per token, as the reference
    assert sqnr_db(layer.reference(x), layer(x)) > 100
    assert not torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(), layer.bias))
    assert sqnr_db(lin(x), layer(x)) > 40


def test_spec_round_trip_and_dtype_moves():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    act = {"act_scale": torch.tensor(0.05), "act_zero_point": torch.tensor(3.0), "smooth": torch.rand(32) + 1}
    layer = Int8Linear(Int8Linear.from_module(lin).weight_t.t(), torch.rand(16) + 0.1, lin.bias, **act)
    again = Int8Linear.from_spec(layer.spec())
    again.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(6, 32)
    assert torch.equal(again.reference(x), layer.reference(x))
    assert set(layer.state_dict()) == {"weight_t", "weight_scale", "bias", "act_scale", "act_zero_point", "smooth"}
    nn.Sequential(layer).to(torch.bfloat16)
    assert layer.weight_t.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.storage_bytes() == 32 * 16 + 4 * (16 + 16 + 1 + 1 + 32)


def test_weight_memory_is_a_quarter_of_fp32():
    layer = Int8Linear.from_module(nn.Linear(1024, 1024, bias=False))
    layer.set_kernel("int8")
    assert layer.storage_bytes() / (1024 * 1024 * 4) <= 0.251
    assert layer._cache is None  # the int8 kernel holds no second copy


def test_bad_input_is_rejected_before_building():
    with pytest.raises(TypeError, match="codes must be a 2-D int8"):
        Int8Linear(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="weight_scale must hold one scale per output channel"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match="act_scale must be one positive value"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4), act_scale=torch.tensor(-1.0))
    with pytest.raises(ValueError, match=r"smooth must be \(4,\)"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4), smooth=torch.ones(5))
    with pytest.raises(ValueError, match="kernel='int4' is not a kernel of Int8Linear"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4)).set_kernel("int4")


def test_int_mm_shape_rules():
    assert int_mm_ok(24, 40, torch.device("cpu")) and int_mm_ok(3, 5, torch.device("cpu"))
    assert int_mm_ok(32, 16, torch.device("cuda")) and not int_mm_ok(36, 16, torch.device("cuda"))
    assert not int_mm_ok(8, 16, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 17, 300])
def test_cuda_int8_kernel_pads_small_batches(rows):
    torch.manual_seed(0)
    layer = Int8Linear.from_module(nn.Linear(256, 128)).cuda()
    layer.set_kernel("int8")
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (rows, 128)
    assert sqnr_db(layer.reference(x).float(), y.float()) >= 40


@pytest.mark.gpu
def test_cuda_unsupported_shape_has_no_int8_kernel():
    layer = Int8Linear.from_module(nn.Linear(36, 20)).cuda()
    assert "int8" not in layer.available_kernels()
    with pytest.raises(ValueError, match="not available"):
        layer.set_kernel("int8")


def test_weight_only_layer_equals_a_qat_layer_without_activation_quantization():
    torch.manual_seed(0)
    fq = _fake_quant(nn.Linear(32, 16), None)
    exported = _int8_of(fq, act_bits=None)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(exported.reference(x), fq(x))
    assert exported.available_kernels() == ["reference", "float"]  # no W8A8 path: activations stay float
    assert exported.spec()["act"] == "none"
    again = Int8Linear.from_spec(exported.spec())
    again.load_state_dict(exported.state_dict())
    assert torch.equal(again.reference(x), exported.reference(x))
    with pytest.raises(ValueError, match="act_bits=None"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4), act_bits=None, act_scale=torch.tensor(1.0))


# ------------------------------------------------------------------------------------------------ oneDNN
ONEDNN_REASON = onednn_unsupported_reason()
needs_onednn = pytest.mark.skipif(ONEDNN_REASON is not None, reason=f"oneDNN int8: {ONEDNN_REASON}")


@needs_onednn
def test_onednn_integer_accumulation_is_exact():
    torch.manual_seed(0)
    codes = torch.randint(-128, 128, (40, 96), dtype=torch.int8)  # -128 included: the full int8 range
    q = torch.randint(-127, 128, (9, 96), dtype=torch.int8)
    y = qlinear(shift_u8(q), 1.0, U8_SHIFT, prepack_linear(codes), torch.ones(40), None, torch.float32)
    assert torch.equal(y.long(), q.long() @ codes.long().t())  # |sum| < 2^24: exact in float32


@needs_onednn
@pytest.mark.parametrize("act", ["token", "static", "static zero-point", "smooth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("per_row", [7, KERNEL_ROWS])  # 14 rows: the C++ quantize / rescale; 2 x 128: compiled
def test_onednn_kernel_matches_reference(act, dtype, compiled, per_row):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    kwargs = {
        "token": {},
        "static": {"act_scale": torch.tensor(0.03)},
        "static zero-point": {"act_scale": torch.tensor(0.03), "act_zero_point": torch.tensor(-5.0)},
        "smooth": {"smooth": torch.rand(64) + 0.5},
    }[act]
    layer = Int8Linear(Int8Linear.from_module(lin).weight_t.t(), torch.rand(48) / 100 + 1e-3, lin.bias, **kwargs)
    layer.set_kernel("onednn")
    x = torch.randn(2, per_row, 64, dtype=dtype)
    y = _forward(layer, x, compiled)
    assert y.shape == (2, per_row, 48) and y.dtype == dtype
    assert sqnr_db(layer.reference(x).float(), y.float()) >= (60 if dtype == torch.float32 else 40)
    assert layer(x[:0]).shape == (0, per_row, 48)


@needs_onednn
def test_onednn_static_codes_equal_the_integer_formula():
    """Static asymmetric inputs: u = q + 128, zero-point Z + 128; oneDNN's result is (q - Z) W_q^T S_x S_w + b."""
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    w_scale, bias = torch.rand(16) + 0.5, torch.randn(16)
    layer = Int8Linear(codes, w_scale, bias, act_scale=torch.tensor(0.25), act_zero_point=torch.tensor(7.0))
    layer.set_kernel("onednn")
    x = torch.randn(5, 32) * 4
    q = torch.clamp(torch.round(x / 0.25 + 7), -128, 127)
    exact = ((q - 7).double() @ codes.double().t()) * 0.25 * w_scale.double() + bias.double()
    assert torch.allclose(layer(x).double(), exact, rtol=1e-6, atol=1e-4)


@needs_onednn
def test_onednn_cache_is_rebuilt_after_load_and_survives_copies():
    import copy
    import pickle

    torch.manual_seed(0)
    layer = Int8Linear.from_module(nn.Linear(32, 16))
    layer.set_kernel("onednn")
    x = torch.randn(4, 32)
    other = Int8Linear.from_module(nn.Linear(32, 16))
    other.set_kernel("onednn")
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))  # the prepacked weight follows the loaded codes
    assert set(layer.state_dict()) == {"weight_t", "weight_scale", "bias"}  # non-persistent
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.kernel == "onednn" and torch.equal(clone(x), layer(x))


@needs_onednn
def test_small_rows_run_their_own_kernel():
    torch.manual_seed(0)
    layer = Int8Linear.from_module(nn.Linear(32, 16))
    layer.set_kernel("float", small_kernel="onednn")
    calls = []
    layer._kernel_forward = lambda x, kernel: calls.append((x.shape[0], kernel)) or torch.zeros(x.shape[0], 16)
    layer(torch.randn(1, SMALL_ROWS, 32)), layer(torch.randn(SMALL_ROWS + 1, 32))
    assert calls == [(SMALL_ROWS, "onednn")]  # SMALL_ROWS + 1 rows ran the float kernel
    assert layer.kernel_for(SMALL_ROWS) == "onednn" and layer.kernel_for(SMALL_ROWS + 1) == "float"


def test_onednn_unavailable_without_quantized_inputs():
    layer = Int8Linear.from_module(nn.Linear(32, 16), act_bits=None)
    assert "onednn" not in layer.available_kernels()
    with pytest.raises(ValueError, match="kernel='onednn' is not available"):
        layer.set_kernel("onednn")
