import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.export.int4_linear import Int4Linear, kernel_group_size
from lightning_compress.functional.packing import pack_bits
from lightning_compress.functional.quant import compute_qparams, quantize
from lightning_compress.nn.fake_quant import FakeQuantLinear, WeightQuantizer
from lightning_compress.nn.quantized import QuantizedWeight
from tests.conftest import sqnr_db


def make_linear(in_features: int = 256, out_features: int = 64, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def converted_fake_quant(lin: nn.Linear, group_size: int, symmetric: bool) -> tuple[FakeQuantLinear, QuantizedWeight]:
    quantizer = WeightQuantizer(lin.weight, bits=4, group_size=group_size, symmetric=symmetric)
    layer = FakeQuantLinear.from_module(lin, quantizer)
    return layer, layer.weight_quantizer.convert(layer.weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_is_bitwise_the_converted_fake_quant_layer(symmetric):
    layer, q = converted_fake_quant(make_linear(), group_size=32, symmetric=symmetric)
    int4 = Int4Linear(q.codes, q.scale, q.zero_point, layer.bias, group_size=32)
    assert torch.equal(int4.dequantized_weight(), layer.weight_quantizer(layer.weight))
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        assert torch.equal(int4.reference(x), layer(x))
        assert torch.equal(int4(x), layer(x))  # the default kernel is the reference


@pytest.mark.parametrize("symmetric", [True, False])
def test_from_module_is_round_to_nearest_with_min_max_scales(symmetric):
    lin = make_linear()
    int4 = Int4Linear.from_module(lin, group_size=64, symmetric=symmetric)
    scale, zero_point = compute_qparams(lin.weight.detach(), 4, symmetric, group_size=64)
    assert torch.equal(int4.codes(), quantize(lin.weight.detach(), scale, zero_point, 4))
    assert torch.equal(int4.scale, scale)
    assert (int4.zero_point is None) == symmetric
    assert torch.equal(int4.bias, lin.bias.detach())


def test_per_channel_scales_mean_group_size_in_features():
    lin = make_linear(512, 48)
    int4 = Int4Linear.from_module(lin, group_size=None, symmetric=False)
    assert int4.group_size == 512 and int4.scale.shape == (48, 1)
    layer, q = converted_fake_quant(make_linear(512, 48), group_size=None, symmetric=False)
    assert torch.equal(int4.dequantized_weight(), layer.weight_quantizer(layer.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group_size", "symmetric"), [(32, True), (64, False), (128, True), (None, False)])
def test_int4_cpu_kernel_matches_reference(dtype, group_size, symmetric):
    int4 = Int4Linear.from_module(make_linear(512, 64), group_size=group_size, symmetric=symmetric)
    assert "int4" in int4.available_kernels()
    x = torch.randn(2, 5, 512, dtype=dtype)
    ref = int4.reference(x)
    int4.set_kernel("int4")
    y = int4(x)
    assert y.shape == (2, 5, 64) and y.dtype == dtype
    # measured: about 128-131 dB in float32 (the kernel is exact up to rounding), 48-49 dB in bfloat16
    assert sqnr_db(ref.float(), y.float()) >= (100.0 if dtype == torch.float32 else 40.0)


def test_int4_cpu_kernel_without_bias_and_with_no_tokens():
    int4 = Int4Linear.from_module(make_linear(bias=False), group_size=32)
    int4.set_kernel("int4")
    x = torch.randn(4, 256)
    assert sqnr_db(int4.reference(x), int4(x)) >= 100.0
    assert int4(torch.randn(0, 256)).shape == (0, 64)


@pytest.mark.parametrize(
    ("shape", "group_size"),
    [((24, 256), 32), ((64, 256), 16), ((64, 48), 48)],  # out % 16 != 0; no kernel group divides 16 or 48
)
def test_int4_kernel_unavailable_where_the_cpu_kernel_cannot_run_the_layer(shape, group_size):
    out_features, in_features = shape
    int4 = Int4Linear.from_module(make_linear(in_features, out_features), group_size=group_size)
    assert int4.available_kernels() == ["reference", "float"]
    with pytest.raises(ValueError, match="kernel='int4' is not available"):
        int4.set_kernel("int4")


def test_kernel_group_size():
    assert [kernel_group_size(g) for g in (32, 96, 128, 512, 4096, 16, 48)] == [32, 32, 128, 256, 256, None, None]


def test_float_kernel_is_f_linear_of_the_dequantized_weight():
    int4 = Int4Linear.from_module(make_linear(), group_size=32, symmetric=False)
    int4.set_kernel("float")
    x = torch.randn(2, 3, 256)
    assert torch.equal(int4(x), F.linear(x, int4.dequantized_weight(), int4.bias))


def test_storage_is_half_a_byte_per_weight_plus_the_scales():
    int4 = Int4Linear.from_module(make_linear(512, 512, bias=False), group_size=128)
    assert int4.packed.dtype == torch.uint8 and int4.packed.shape == (512, 256)
    assert set(int4.state_dict()) == {"packed", "scale"}
    # 512 * 256 code bytes + 512 * 4 float32 scales = 131072 + 8192
    assert int4.storage_bytes() == 139264
    assert int4.storage_bytes() / (512 * 512 * 4) == pytest.approx(0.1328125)
    assert int4.storage_bytes() <= 0.14 * 512 * 512 * 4


def test_packed_buffer_is_pack_bits_of_the_offset_codes():
    codes = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    int4 = Int4Linear(codes, torch.ones(1, 1), None, None, group_size=4)
    assert int4.packed.tolist() == [[0 | 15 << 4, 8 | 7 << 4]]
    assert torch.equal(int4.packed, pack_bits(codes.to(torch.int32) + 8, 4))
    assert torch.equal(int4.codes(), codes)


@pytest.mark.parametrize(("symmetric", "bias"), [(True, False), (False, True)])
def test_from_spec_round_trip(symmetric, bias):
    int4 = Int4Linear.from_module(make_linear(bias=bias), group_size=64, symmetric=symmetric)
    spec = int4.spec()
    assert spec == {"in_features": 256, "out_features": 64, "group_size": 64, "symmetric": symmetric, "bias": bias}
    loaded = Int4Linear.from_spec(spec)
    assert {k: (v.shape, v.dtype) for k, v in loaded.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in int4.state_dict().items()
    }
    loaded.load_state_dict(int4.state_dict(), strict=True)
    x = torch.randn(5, 256)
    assert torch.equal(loaded(x), int4(x))
    loaded.set_kernel("int4")
    int4.set_kernel("int4")
    assert torch.equal(loaded(x), int4(x))


def test_from_spec_errors():
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_spec({"in_features": 256, "out_features": 64, "symmetric": True, "bias": False})
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=256"):
        Int4Linear.from_spec(
            {"in_features": 256, "out_features": 64, "group_size": 48, "symmetric": True, "bias": False}
        )


def test_module_to_bfloat16_keeps_the_compressed_buffers():
    int4 = Int4Linear.from_module(make_linear(), group_size=32, symmetric=False)
    int4.set_kernel("int4")
    model = nn.Sequential(int4).to(torch.bfloat16)
    assert int4.scale.dtype == torch.float32 and int4.zero_point.dtype == torch.float32
    assert int4.bias.dtype == torch.float32 and int4.packed.dtype == torch.uint8
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16 and sqnr_db(int4.reference(x).float(), y.float()) >= 40.0


def test_constructor_errors_name_the_parameter():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    scale = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\].*got values in \[-9, 0\]"):
        Int4Linear(codes.clone().index_fill_(1, torch.tensor([3]), -9), scale, None, None, group_size=4)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\].*got values in \[0, 8\]"):
        Int4Linear(codes.clone().index_fill_(0, torch.tensor([1]), 8), scale, None, None, group_size=4)
    with pytest.raises(TypeError, match="codes must be int8"):
        Int4Linear(codes.int(), scale, None, None, group_size=4)
    with pytest.raises(ValueError, match="group_size=3 does not divide in_features=8"):
        Int4Linear(codes, torch.ones(4, 3), None, None, group_size=3)
    with pytest.raises(TypeError, match="group_size must be an int"):
        Int4Linear(codes, scale, None, None, group_size=4.0)
    with pytest.raises(ValueError, match="in_features=7 is odd"):
        Int4Linear(torch.zeros(4, 7, dtype=torch.int8), torch.ones(4, 1), None, None, group_size=7)
    with pytest.raises(ValueError, match=r"scale has shape \(4, 1\); allowed: \(4, 2\)"):
        Int4Linear(codes, torch.ones(4, 1), None, None, group_size=4)
    with pytest.raises(TypeError, match="scale must be a floating-point Tensor"):
        Int4Linear(codes, torch.ones(4, 2, dtype=torch.int32), None, None, group_size=4)
    with pytest.raises(ValueError, match="scale must be positive"):
        Int4Linear(codes, torch.zeros(4, 2), None, None, group_size=4)
    with pytest.raises(ValueError, match="zero_point has shape"):
        Int4Linear(codes, scale, torch.zeros(4, 1), None, group_size=4)
    with pytest.raises(ValueError, match="zero_point must hold finite integers"):
        Int4Linear(codes, scale, torch.full((4, 2), 0.5), None, group_size=4)
    with pytest.raises(ValueError, match="bias has shape"):
        Int4Linear(codes, scale, None, torch.zeros(5), group_size=4)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        Int4Linear.from_module(nn.Conv1d(8, 4, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_cuda_kernel_matches_reference(symmetric):
    int4 = Int4Linear.from_module(make_linear(512, 256), group_size=128, symmetric=symmetric)
    int4.set_kernel("int4")  # the CPU layout first: moving rebuilds the cache in tinygemm's layout
    int4.to("cuda")
    if "int4" not in int4.available_kernels():
        pytest.skip(f"no tinygemm on {torch.cuda.get_device_name()}")
    x = torch.randn(3, 7, 512, dtype=torch.bfloat16, device="cuda")
    y = int4(x)
    assert y.shape == (3, 7, 256) and y.dtype == torch.bfloat16 and y.device.type == "cuda"
    assert sqnr_db(int4.reference(x).float(), y.float()) >= 40.0
    per_channel = Int4Linear.from_module(make_linear(4096, 64), group_size=None, symmetric=symmetric).cuda()
    per_channel.set_kernel("int4")
    x = torch.randn(9, 4096, dtype=torch.float32, device="cuda")
    assert sqnr_db(per_channel.reference(x), per_channel(x)) >= 40.0  # fp32 input computed in bf16
