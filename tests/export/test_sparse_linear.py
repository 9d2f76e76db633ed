"""SemiStructuredSparseLinear: the reference equals the masked dense layer (float) and Int8Linear's math (int8)
exactly; the dense-cache kernels and the CUDA 2:4 kernels are within 40 dB of it; only the compressed form persists."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.export.int8_linear import Int8Linear, w8a8_linear
from lightning_compress.export.onednn import onednn_unsupported_reason
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.functional.masks import nm_mask
from lightning_compress.functional.quant import compute_qparams, quantize
from tests.conftest import sqnr_db

ACT_CONFIGS = {
    "dynamic": {},
    "static": {"act_scale": torch.tensor(0.03)},
    "static_zero_point": {"act_scale": torch.tensor(0.03), "act_zero_point": torch.tensor(-5.0)},
    "smooth": {"smooth": torch.linspace(0.5, 2.0, 64)},
}


def _pruned(out: int, k: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Tensor:
    """A random ``(out, k)`` weight with the 2:4 mask applied (2 largest ``|w|`` of every 4 inputs kept)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=gen) / k**0.5
    return (w * nm_mask(w)).to(device, dtype)


def _codes(out: int, k: int, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """2:4 int8 codes and their per-channel scales (round-to-nearest of a pruned weight)."""
    w = _pruned(out, k, device=device)
    s, z = compute_qparams(w, 8, symmetric=True, axis=0)
    return quantize(w, s, z, 8), s


# ---------------------------------------------------------------------------------------------- float flavour
F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(("w_dtype", "x_dtype"), [(F32, F32), (BF16, BF16), (F32, BF16)])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64)])
def test_float_reference_is_bitwise_the_masked_dense_linear(w_dtype, x_dtype, shape):
    w = _pruned(24, 64, w_dtype)
    bias = torch.randn(24).to(w_dtype)
    layer = SemiStructuredSparseLinear(w, bias)
    assert layer.values.dtype == w_dtype and layer.values.shape == (24, 32)
    assert layer.indices.dtype == torch.uint8 and layer.indices.shape == (24, 8)
    assert list(layer.state_dict()) == ["values", "indices", "bias"]
    x = torch.randn(shape).to(x_dtype)
    expected = F.linear(x, w.to(x_dtype), bias.to(x_dtype))
    assert torch.equal(layer.reference(x), expected)
    assert torch.equal(layer(x), expected)  # the default kernel is the reference
    assert torch.equal(layer.dequantized_weight(), w.float())


def test_float_kernel_equals_reference_in_fp32():
    layer = SemiStructuredSparseLinear(_pruned(48, 64), torch.randn(48))
    assert layer.available_kernels() == ["reference", "float"]
    layer.set_kernel("float")
    x = torch.randn(3, 7, 64)
    assert torch.equal(layer(x), layer.reference(x))


def test_from_module_keeps_dtype_and_output():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(torch.float16)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight))
    layer = SemiStructuredSparseLinear.from_module(lin)
    assert layer.values.dtype == torch.float16 and layer.spec()["dtype"] == "float16"
    x = torch.randn(4, 32).to(torch.float16)
    assert torch.equal(layer(x), lin(x))
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        SemiStructuredSparseLinear.from_module(nn.Conv1d(4, 4, 1))


# ---------------------------------------------------------------------------------------------- int8 flavour
@pytest.mark.parametrize("act", list(ACT_CONFIGS))
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64)])
def test_int8_reference_is_int8_linear_math_exactly(act, shape):
    """Same fake-quantized input, same dequantized weight, same ``F.linear``: bit for bit Int8Linear's reference.

    (Int8Linear hands ``F.linear`` its weight as a transposed view of ``weight_t``, which at some shapes makes the
    BLAS sum in another order; the comparison uses its math with the ordinary row-major weight layout.)
    """
    codes, scale = _codes(32, 64)
    bias = torch.randn(32)
    kwargs = ACT_CONFIGS[act]
    sparse = SemiStructuredSparseLinear(codes, bias, weight_scale=scale, **kwargs)
    dense = Int8Linear(codes, scale, bias, **kwargs)
    x = torch.randn(shape)
    assert torch.equal(sparse.fake_quantized_input(x), dense.fake_quantized_input(x))
    assert torch.equal(sparse.dequantized_weight(), dense.dequantized_weight())
    expected = F.linear(dense.fake_quantized_input(x), dense.dequantized_weight().contiguous(), bias)
    assert torch.equal(sparse.reference(x), expected)


@pytest.mark.parametrize("act", list(ACT_CONFIGS))
def test_int8_kernel_matches_int8_linear_kernel(act):
    codes, scale = _codes(32, 64)
    bias = torch.randn(32)
    sparse = SemiStructuredSparseLinear(codes, bias, weight_scale=scale, **ACT_CONFIGS[act])
    dense = Int8Linear(codes, scale, bias, **ACT_CONFIGS[act])
    onednn = ["onednn"] if onednn_unsupported_reason() is None else []
    assert sparse.available_kernels() == ["reference", "float", "int8", *onednn]
    x = torch.randn(2, 9, 64)
    for kernel in ["int8", *onednn]:
        sparse.set_kernel(kernel)
        dense.set_kernel(kernel)
        y = sparse(x)
        assert sqnr_db(sparse.reference(x), y) >= 40
        assert torch.equal(y, dense(x))  # the same codes through the same W8A8 path


@pytest.mark.parametrize("act", list(ACT_CONFIGS))
def test_pluggable_w8a8_equals_w8a8_linear(act):
    """The CUDA 2:4 int8 path's quantize / rescale (any exact matmul) is bit for bit ``w8a8_linear``'s."""
    codes, scale = _codes(32, 64)
    codes_t, scale, bias = codes.t().contiguous(), scale.reshape(32), torch.randn(32)
    kw = {"act_scale": None, "act_zero_point": None, "smooth": None, **ACT_CONFIGS[act]}
    col_sum = codes_t.sum(0, dtype=torch.int32) if kw["act_zero_point"] is not None else None
    x = torch.randn(9, 64)
    expected = w8a8_linear(x, codes_t, scale, bias, 8, col_sum=col_sum, **kw)
    got = w8a8_linear(x, None, scale, bias, 8, col_sum=col_sum, matmul=lambda q: torch._int_mm(q, codes_t), **kw)
    assert torch.equal(got, expected)


def test_storage_is_values_indices_and_scales():
    codes, scale = _codes(512, 512)
    layer = SemiStructuredSparseLinear(codes, torch.randn(512), weight_scale=scale)
    assert list(layer.state_dict()) == ["values", "indices", "weight_scale", "bias"]
    assert layer.values.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.values.numel() + layer.indices.numel() == 512 * 256 + 512 * 64  # one byte each
    assert layer.storage_bytes() == 512 * 256 + 512 * 64 + 512 * 4 + 512 * 4  # + scales, + bias: 167936 bytes
    dense_fp32 = 512 * 512 * 4 + 512 * 4  # 1050624 bytes
    assert layer.storage_bytes() <= 0.16 * dense_fp32  # 0.1598


# ---------------------------------------------------------------------------------------------- spec, dtypes
@pytest.mark.parametrize(
    "make",
    [
        lambda: SemiStructuredSparseLinear(_pruned(16, 32, torch.bfloat16), torch.randn(16)),
        lambda: SemiStructuredSparseLinear(_pruned(16, 32, torch.float64)),
        lambda: SemiStructuredSparseLinear(
            _codes(16, 32)[0],
            torch.randn(16),
            weight_scale=_codes(16, 32)[1],
            act_bits=6,
            act_scale=torch.tensor(0.05),
            act_zero_point=torch.tensor(3.0),
            smooth=torch.rand(32) + 0.5,
        ),  # fmt: skip
        lambda: SemiStructuredSparseLinear(_codes(16, 32)[0], weight_scale=_codes(16, 32)[1]),
    ],
    ids=["float_bf16_bias", "float64", "int8_static_smooth", "int8_dynamic"],
)
def test_spec_round_trip_through_load_state_dict(make):
    layer = make()
    spec = json.loads(json.dumps(layer.spec()))
    empty = SemiStructuredSparseLinear.from_spec(spec)
    assert empty.spec() == spec
    empty.load_state_dict(layer.state_dict(), strict=True)
    for key, value in layer.state_dict().items():
        assert empty.state_dict()[key].dtype == value.dtype, key
    x = torch.randn(3, 32)
    assert torch.equal(empty(x), layer(x))
    assert empty.storage_bytes() == layer.storage_bytes()


def test_placeholder_layer_is_valid_2_4():
    spec = {"in_features": 16, "out_features": 8, "bias": False, "flavour": "int8"}
    act = {"act_bits": 8, "act": "token", "act_zero_point": False, "smooth": False}
    empty = SemiStructuredSparseLinear.from_spec({**spec, **act})
    assert torch.equal(empty.dequantized_weight(), torch.zeros(8, 16))


def test_model_to_bfloat16_keeps_codes_and_float32_scales():
    codes, scale = _codes(16, 32)
    model = nn.Sequential(
        SemiStructuredSparseLinear(codes, torch.randn(16), weight_scale=scale, act_scale=torch.tensor(0.05)),
        SemiStructuredSparseLinear(_pruned(8, 16), torch.randn(8)),
    )
    model.to(torch.bfloat16)
    int8_layer, float_layer = model
    assert int8_layer.values.dtype == torch.int8 and int8_layer.indices.dtype == torch.uint8
    assert int8_layer.weight_scale.dtype == torch.float32 and int8_layer.act_scale.dtype == torch.float32
    assert float_layer.values.dtype == torch.float32 and float_layer.bias.dtype == torch.float32
    y = model(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 8)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_arguments():
    w, (codes, scale) = _pruned(8, 16), _codes(8, 16)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, inputs 0..3 hold 4 non-zeros"):
        SemiStructuredSparseLinear(torch.ones(8, 16))
    with pytest.raises(ValueError, match="in_features=12 must be a positive multiple of 8"):
        SemiStructuredSparseLinear(torch.zeros(8, 12))
    with pytest.raises(ValueError, match="weight_scale is required with int8 codes"):
        SemiStructuredSparseLinear(codes)
    with pytest.raises(ValueError, match="weight_scale must be None for a float32 weight"):
        SemiStructuredSparseLinear(w, weight_scale=scale)
    with pytest.raises(ValueError, match=r"\['act_scale'\] apply to int8 codes only"):
        SemiStructuredSparseLinear(w, act_scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"bias must be \(8,\), got \(16,\)"):
        SemiStructuredSparseLinear(w, torch.zeros(16))
    with pytest.raises(ValueError, match=r"weight_scale must hold one scale per output channel \(8,\)"):
        SemiStructuredSparseLinear(codes, weight_scale=torch.ones(4))
    with pytest.raises(TypeError, match="weight must be a 2-D"):
        SemiStructuredSparseLinear(torch.zeros(8, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="spec dtype='int8'"):
        SemiStructuredSparseLinear.from_spec(
            {"in_features": 16, "out_features": 8, "bias": False, "flavour": "float", "dtype": "int8"}
        )
    with pytest.raises(ValueError, match="spec flavour='int4' is unknown"):
        SemiStructuredSparseLinear.from_spec({"in_features": 16, "out_features": 8, "bias": False, "flavour": "int4"})


def test_sparse_kernel_is_unavailable_on_cpu():
    layer = SemiStructuredSparseLinear(_pruned(32, 64))
    assert "CUDA" in layer.sparse_unsupported_reason()
    with pytest.raises(ValueError, match=r"kernel='sparse' is not available .* available: \['reference', 'float'\]"):
        layer.set_kernel("sparse")
    assert layer.kernel == "reference"


def _fake_cslt_sparse_mm(packed: Tensor, dense_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """CPU stand-in for ``torch._cslt_sparse_mm`` on int8 that checks the layout cuSPARSELt needs."""
    assert not dense_b.is_contiguous() and dense_b.shape[1] % 16 == 0 and out_dtype == torch.int32
    return (packed.long() @ dense_b.long()).to(torch.int32)


def test_sparse_glue_with_the_cuda_ops_faked_on_cpu(monkeypatch):
    """The casts, cache rebuilds, row padding and transposes around the CUDA 2:4 ops, with CPU stand-ins."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as Cslt

    from lightning_compress.export import sparse_linear

    monkeypatch.setattr(sparse_linear, "sparse_backend", lambda device: Cslt)
    monkeypatch.setattr(sparse_linear, "_probe_ok", lambda *args: True)
    monkeypatch.setattr(Cslt, "from_dense", classmethod(lambda cls, w: w.clone()))
    monkeypatch.setattr(torch, "_cslt_compress", lambda w: w.clone())
    monkeypatch.setattr(torch, "_cslt_sparse_mm", _fake_cslt_sparse_mm)
    layer = SemiStructuredSparseLinear(_pruned(32, 64), torch.randn(32))
    layer.set_kernel("sparse")
    assert layer._cache.dtype == torch.bfloat16
    x = torch.randn(3, 5, 64)
    assert layer(x).dtype == torch.float32 and sqnr_db(layer.reference(x), layer(x)) >= 40
    layer(x.half())
    assert layer._cache.dtype == torch.float16
    codes, scale = _codes(32, 64)
    for act in ACT_CONFIGS.values():
        int8 = SemiStructuredSparseLinear(codes, torch.randn(32), weight_scale=scale, **act)
        int8.set_kernel("sparse")
        kw = {"act_scale": None, "act_zero_point": None, "smooth": None, **act}
        col_sum = codes.sum(1, dtype=torch.int32) if kw["act_zero_point"] is not None else None
        for rows in (1, 37):
            x = torch.randn(rows, 64)
            expected = w8a8_linear(x, codes.t().contiguous(), int8.weight_scale, int8.bias, 8, col_sum=col_sum, **kw)
            assert torch.equal(int8(x), expected)


# ---------------------------------------------------------------------------------------------- CUDA 2:4 kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_float_sparse_kernel(dtype):
    layer = SemiStructuredSparseLinear(_pruned(3072, 10240, dtype, "cuda"), torch.randn(3072, device="cuda"))
    assert layer.sparse_unsupported_reason() is None
    layer.set_kernel("sparse")
    for x in (torch.randn(2, 37, 10240, device="cuda", dtype=dtype), torch.randn(5, 10240, device="cuda")):
        y = layer(x)  # 74 rows: torch pads them; the fp32 input computes in the values' half dtype
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 3072)
        assert sqnr_db(layer.reference(x).float(), y.float()) >= 40


@pytest.mark.gpu
def test_cuda_float_sparse_kernel_follows_the_input_half_dtype():
    layer = SemiStructuredSparseLinear(_pruned(256, 512, torch.float32, "cuda"))
    layer.set_kernel("sparse")
    assert layer._cache.dtype == torch.bfloat16
    x = torch.randn(40, 512, device="cuda", dtype=torch.float16)
    assert sqnr_db(layer.reference(x).float(), layer(x).float()) >= 40
    assert layer._cache.dtype == torch.float16


@pytest.mark.gpu
def test_cuda_sparse_kernel_unavailable_below_the_backend_minimum():
    layer = SemiStructuredSparseLinear(_pruned(24, 40, torch.float16, "cuda"))
    assert "sparse" not in layer.available_kernels()
    assert "multiple of" in layer.sparse_unsupported_reason()
    with pytest.raises(ValueError, match="not available"):
        layer.set_kernel("sparse")
    layer.set_kernel("float")
    x = torch.randn(3, 40, device="cuda", dtype=torch.float16)
    assert torch.equal(layer(x), layer.reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("act", list(ACT_CONFIGS))
@pytest.mark.parametrize("rows", [1, 37])
def test_cuda_int8_sparse_kernel_is_exactly_eager_w8a8(act, rows):
    if not torch.backends.cusparselt.is_available():
        pytest.skip("the int8 2:4 kernel needs cuSPARSELt")
    codes, scale = _codes(256, 64, "cuda")  # smooth's divisor is (64,)
    bias = torch.randn(256, device="cuda")
    kwargs = {k: v.cuda() for k, v in ACT_CONFIGS[act].items()}
    layer = SemiStructuredSparseLinear(codes, bias, weight_scale=scale, **kwargs)
    assert layer.sparse_unsupported_reason() is None
    layer.set_kernel("sparse")
    x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 256)
    assert sqnr_db(layer.reference(x).float(), y.float()) >= 40
    kw = {"act_scale": None, "act_zero_point": None, "smooth": None, **kwargs}
    codes_t = codes.t().contiguous()
    col_sum = codes_t.sum(0, dtype=torch.int32) if kw["act_zero_point"] is not None else None
    assert torch.equal(y, w8a8_linear(x, codes_t, layer.weight_scale, layer.bias, 8, col_sum=col_sum, **kw))
