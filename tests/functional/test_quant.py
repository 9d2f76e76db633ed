import itertools
import math

import pytest
import torch

from lightning_compress.functional.quant import (
    MIN_SCALE,
    compute_qparams,
    dequantize,
    expand_params,
    fake_quantize,
    group_shape,
    lsq_fake_quantize,
    qparams_from_range,
    quant_range,
    quantize,
    reduce_to_params,
)
from tests.conftest import sqnr_db

BITS = range(2, 9)
# (axis, group_size) combinations: per-tensor, per-channel on each axis, per-group.
GRANULARITIES = [(None, None), (0, None), (1, None), (None, 16)]


def test_worked_example_int8_asymmetric():
    scale, zero_point = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), bits=8, symmetric=False)
    assert scale.item() == pytest.approx(3 / 255, rel=1e-7)
    assert zero_point.item() == -43
    q = quantize(torch.tensor(0.5), scale, zero_point, 8)
    assert q.item() == 0 and q.dtype == torch.int8
    assert dequantize(torch.tensor(0, dtype=torch.int8), scale, zero_point).item() == pytest.approx(
        0.50588235, abs=1e-7
    )


@pytest.mark.parametrize("bits", BITS)
def test_quant_range_is_signed_n_bit(bits):
    assert quant_range(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [1, 9, 0, -3])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\], got"):
        quant_range(bits)


def test_bits_must_be_int():
    with pytest.raises(TypeError, match="bits"):
        quant_range(4.0)


@pytest.mark.parametrize(("bits", "symmetric", "gran"), list(itertools.product(BITS, [True, False], GRANULARITIES)))
def test_roundtrip_error_bounded_by_half_step(bits, symmetric, gran):
    torch.manual_seed(bits)
    x = torch.randn(8, 32)
    axis, group = gran
    scale, zp = compute_qparams(x, bits, symmetric, axis=axis, group_size=group)
    q = quantize(x, scale, zp, bits)
    qmin, qmax = quant_range(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, scale, zp) - x).abs()
    # min-max ranges never clip, so every value is within half a step of its code
    assert torch.all(err <= expand_params(scale, x.shape) / 2 + 1e-6)


@pytest.mark.parametrize(("bits", "symmetric", "gran"), list(itertools.product(BITS, [True, False], GRANULARITIES)))
def test_fake_quantize_equals_dequantize_quantize_exactly(bits, symmetric, gran):
    torch.manual_seed(0)
    x = torch.randn(8, 32) * 3
    scale, zp = compute_qparams(x, bits, symmetric, *gran)
    # shrink the scale so some values clip: equality must also hold on the clipped ends
    scale = scale * 0.7
    assert torch.equal(fake_quantize(x, scale, zp, bits), dequantize(quantize(x, scale, zp, bits), scale, zp))
    if symmetric:  # zero_point=None is the symmetric fast path, same values
        assert torch.equal(fake_quantize(x, scale, None, bits), fake_quantize(x, scale, zp, bits))


def test_param_shapes_per_granularity():
    x = torch.randn(6, 12)
    assert compute_qparams(x, 8).scale.shape == (1, 1)
    assert compute_qparams(x, 8, axis=0).scale.shape == (6, 1)
    assert compute_qparams(x, 8, axis=1).scale.shape == (1, 12)
    assert compute_qparams(x, 8, axis=-1).scale.shape == (1, 12)
    assert compute_qparams(x, 8, group_size=4).scale.shape == (6, 3)


def test_per_channel_scale_is_row_absmax_over_qmax():
    x = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -0.125]])
    scale, zp = compute_qparams(x, 4, symmetric=True, axis=0)
    assert torch.equal(scale, torch.tensor([[4.0 / 7], [0.5 / 7]]))
    assert torch.equal(zp, torch.zeros(2, 1))


def test_group_scales_are_each_groups_absmax():
    x = torch.arange(1.0, 17.0).reshape(2, 8)
    scale, _ = compute_qparams(x, 8, group_size=4)
    expected = torch.tensor([[4.0, 8.0], [12.0, 16.0]]) / 127
    assert torch.equal(scale, expected)


def test_conv_weight_grouped_along_flattened_input():
    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3)
    scale, zp = compute_qparams(w, 4, group_size=24)
    assert scale.shape == (4, 3)
    flat = w.reshape(4, 3, 24).abs().amax(dim=2) / 7
    assert torch.equal(scale, flat)
    out = fake_quantize(w, scale, zp, 4)
    assert out.shape == w.shape
    assert torch.equal(out, dequantize(quantize(w, scale, zp, 4), scale, zp))


def test_per_channel_conv_axis():
    w = torch.randn(4, 3, 2, 2)
    scale, zp = compute_qparams(w, 8, axis=0)
    assert scale.shape == (4, 1, 1, 1)
    assert sqnr_db(w, fake_quantize(w, scale, zp, 8)) > 35


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_zero_and_constant_channels_give_finite_scales(bits, symmetric):
    x = torch.randn(4, 16)
    x[1] = 0.0
    x[2] = 0.37
    scale, zp = compute_qparams(x, bits, symmetric, axis=0)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert scale[1].item() == torch.tensor(MIN_SCALE).item()
    out = fake_quantize(x, scale, zp, bits)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(16))


@pytest.mark.parametrize("bits", BITS)
def test_zero_is_exactly_representable_asymmetric(bits):
    x = torch.tensor([[0.3, 1.7, 0.0, 2.9]])  # all >= 0: the range is widened to include 0
    scale, zp = compute_qparams(x, bits, symmetric=False)
    out = fake_quantize(x, scale, zp, bits)
    assert out[0, 2].item() == 0.0


def test_sqnr_grows_about_6db_per_bit():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    sq = []
    for bits in (4, 6, 8):
        scale, zp = compute_qparams(x, bits, axis=0)
        sq.append(sqnr_db(x, fake_quantize(x, scale, zp, bits)))
    assert sq[0] > 15 and sq[2] > 38
    assert sq[1] - sq[0] == pytest.approx(12.0, abs=1.5)
    assert sq[2] - sq[1] == pytest.approx(12.0, abs=1.5)


def test_ste_passes_gradient_inside_and_zeroes_it_where_clipped():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    scale = torch.tensor([1.0 / 7])  # 4-bit symmetric range [-8/7, 1]
    y = fake_quantize(x, scale, torch.zeros(1), 4)
    y.backward(torch.arange(1.0, 6.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))


def test_fake_quantize_keeps_dtype_bf16():
    x = torch.randn(4, 8).bfloat16()
    scale, zp = compute_qparams(x, 8, axis=0)
    assert fake_quantize(x, scale, zp, 8).dtype == torch.bfloat16


def test_bad_granularity_raises():
    with pytest.raises(ValueError, match="group_size=5 does not divide the input dimension 12"):
        group_shape((6, 12), group_size=5)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        group_shape((6, 12), axis=2)
    with pytest.raises(ValueError, match="not both"):
        group_shape((6, 12), axis=0, group_size=4)


@pytest.mark.parametrize("gran", [(0, None), (None, 8)])
def test_lsq_forward_is_exact_and_scale_gradient_matches_the_formula(gran):
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.float64).float().requires_grad_()
    scale, _ = compute_qparams(x, 4, axis=gran[0], group_size=gran[1])
    scale = (scale * 0.8).requires_grad_()  # some values clip
    y = lsq_fake_quantize(x, scale, 4)
    zp = torch.zeros_like(scale)
    assert torch.equal(y, dequantize(quantize(x, scale, zp, 4), scale, zp))
    upstream = torch.randn_like(y)
    y.backward(upstream)
    v = x.detach() / expand_params(scale.detach(), x.shape)
    inside = (v >= -8) & (v <= 7)
    bracket = torch.where(inside, v.round() - v, v.round().clamp(-8, 7))
    g = 1 / (x.numel() / scale.numel() * 7) ** 0.5
    expected = reduce_to_params(upstream * bracket, scale.shape) * g
    assert torch.allclose(scale.grad, expected, atol=1e-6)
    assert torch.equal(x.grad, upstream * inside)
    assert (scale.grad != 0).all()


@pytest.mark.parametrize("gran", [(0, None), (None, 8)])
def test_lsq_with_a_zero_point_is_exact_and_its_scale_gradient_is_autograds_of_the_ste_formula(gran):
    torch.manual_seed(0)
    x = (torch.randn(6, 16) + 0.7).requires_grad_()
    scale, zero = compute_qparams(x.detach(), 3, symmetric=False, axis=gran[0], group_size=gran[1])
    scale = (scale * 0.8).requires_grad_()  # some values clip at either end
    y = lsq_fake_quantize(x, scale, 3, zero)
    assert torch.equal(y, dequantize(quantize(x.detach(), scale.detach(), zero, 3), scale.detach(), zero))
    upstream = torch.randn_like(y)
    y.backward(upstream)
    # reference: autograd through S * (round_ste(clamp(x / S + Z)) - Z), scaled by LSQ's g (LSQ clips u, unrounded)
    x_ref, s_ref = x.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
    u = x_ref / expand_params(s_ref, x.shape) + expand_params(zero, x.shape)
    c = torch.clamp(u, -4, 3)
    q = c + (c.round() - c).detach()
    g = 1 / (x.numel() / scale.numel() * 3) ** 0.5
    ref = expand_params(s_ref, x.shape) * (q - expand_params(zero, x.shape))
    (ref * upstream).sum().backward()
    assert torch.allclose(scale.grad, s_ref.grad * g, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert (zero != 0).any() and (scale.grad != 0).all()


def test_zero_dim_params_are_per_tensor():
    x = torch.randn(3, 5)
    scale, zp = torch.tensor(0.05), torch.tensor(3.0)
    full = (torch.full((1, 1), 0.05), torch.full((1, 1), 3.0))
    assert torch.equal(fake_quantize(x, scale, zp, 8), fake_quantize(x, *full, 8))
    assert torch.equal(quantize(x, scale, zp, 8), quantize(x, *full, 8))


def _clip_search_reference(row: torch.Tensor, bits: int, symmetric: bool) -> tuple[float, float]:
    """The GPTQ reference's mse quantizer for one row, in Python: shrink the range by p = 1, 0.99, ..., 0.21 and keep
    the first p with the least sum |x - q(x)|^2.4."""
    qmin, qmax = quant_range(bits)
    best, best_err = None, math.inf
    for i in range(80):
        p = 1 - i / 100
        lo, hi = min(float(row.min()) * p, 0.0), max(float(row.max()) * p, 0.0)
        if symmetric:
            s, z = max(-lo, hi) / qmax, 0.0
        else:
            s = (hi - lo) / (qmax - qmin)
            z = float(round(qmin - lo / s))
        q = (torch.clamp(torch.round(row / s + z), qmin, qmax) - z) * s
        err = float((row - q).abs().pow(2.4).sum())
        if err < best_err:
            best, best_err = (s, z), err
    return best


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_clip_search_is_the_per_row_grid_search(symmetric, bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 64, generator=g) * torch.logspace(-1, 1, 12)[:, None]
    qp = compute_qparams(w, bits, symmetric, axis=0, clip_search=True)
    for r in range(12):
        s, z = _clip_search_reference(w[r].double(), bits, symmetric)
        assert float(qp.scale[r, 0]) == pytest.approx(s, rel=1e-5)
        assert float(qp.zero_point[r, 0]) == z
    plain = compute_qparams(w, bits, symmetric, axis=0)
    assert torch.all(qp.scale <= plain.scale) and torch.any(qp.scale < plain.scale)  # some rows clipped, none wider
    grouped = compute_qparams(w, bits, symmetric, group_size=16, clip_search=True)
    s, z = _clip_search_reference(w[3, :16].double(), bits, symmetric)
    assert float(grouped.scale[3, 0]) == pytest.approx(s, rel=1e-5) and float(grouped.zero_point[3, 0]) == z


# ------------------------------------------------------------------------------------------------ FP8 E4M3
def _e4m3_values() -> torch.Tensor:
    """Every finite E4M3 value, from its 256 bit patterns (0x7F / 0xFF are NaN)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)]


def test_fp8_e4m3_is_torchs_cast_within_range_and_saturates_beyond():
    from lightning_compress.functional.quant import FP8_MAX, fp8_e4m3

    grid = _e4m3_values()
    assert FP8_MAX == 448.0 == float(grid.max())
    x = torch.cat([torch.randn(10_000) * 10.0 ** torch.randint(-4, 3, (10_000,)), grid, (grid[1:] + grid[:-1]) / 2])
    x = x[x.abs() <= FP8_MAX]
    assert torch.equal(fp8_e4m3(x).float(), x.to(torch.float8_e4m3fn).float())  # torch's own cast, ties to even
    assert torch.isin(fp8_e4m3(x).float(), grid).all()
    # nearest: no E4M3 value is closer than the one chosen
    err = (fp8_e4m3(x).float() - x).abs()
    assert torch.all(err <= (grid[None, :] - x[:, None]).abs().amin(1))
    beyond = torch.tensor([449.0, 464.0, 1e6, math.inf, -500.0, -math.inf])
    assert fp8_e4m3(beyond).float().tolist() == [448.0] * 4 + [-448.0] * 2
    assert torch.isnan(fp8_e4m3(torch.tensor([math.nan])).float()).all()


@pytest.mark.parametrize(("axis", "group_size"), [(None, None), (0, None), (None, 16)])
def test_fp8_quantize_maps_each_blocks_absmax_onto_448(axis, group_size):
    from lightning_compress.functional.quant import FP8_MAX

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 8)[:, None]
    scale, zero = compute_qparams(w, 8, True, axis=axis, group_size=group_size, method="fp8")
    blocks = w.abs().reshape(8, -1, group_size or 64) if axis is not None or group_size else w.abs().reshape(1, 1, -1)
    assert torch.equal(scale.reshape(-1), (blocks.amax(-1) / FP8_MAX).reshape(-1))
    assert torch.equal(zero, torch.zeros_like(scale))
    codes = quantize(w, scale, zero, 8, "fp8")
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.float(), (w / expand_params(scale, w.shape)).to(torch.float8_e4m3fn).float())
    back = dequantize(codes, scale, zero)
    assert torch.equal(back, fake_quantize(w, scale, None, 8, "fp8"))
    # E4M3 keeps 3 mantissa bits: every value within half a step, 1/16 relative (normal range)
    normal = w.abs() / expand_params(scale, w.shape) >= 2**-6
    assert torch.all(((back - w).abs() / w.abs())[normal] <= 1 / 16)


def test_fp8_fake_quantize_passes_gradient_where_not_saturated():
    x = torch.tensor([0.1, -2.0, 4.4, 5.0, -9.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.01), None, 8, "fp8")  # |x / S| <= 448 for the first three only
    assert y.tolist()[3:] == pytest.approx([4.48, -4.48])
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_fp8_clip_search_never_loses_to_min_max():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    w[:, 0] *= 20  # an outlier per row
    errors = []
    for clip in (False, True):
        s, z = compute_qparams(w, 8, True, axis=0, clip_search=clip, method="fp8")
        errors.append(float((dequantize(quantize(w, s, z, 8, "fp8"), s, z) - w).abs().pow(2.4).sum(1).max()))
    assert errors[1] <= errors[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_scale_dtype_rounds_scales_before_the_zero_point(symmetric, scale_dtype):
    dtype = getattr(torch, scale_dtype)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 1e-3
    w[0] = 0.0  # an all-zero group: the scale is at least the dtype's smallest normal
    s, z = compute_qparams(w, 4, symmetric, group_size=32, scale_dtype=scale_dtype)
    assert torch.equal(s.to(dtype).float(), s) and float(s.min()) >= torch.finfo(dtype).tiny
    lo, hi = w.reshape(8, 2, 32).amin(-1).clamp(max=0), w.reshape(8, 2, 32).amax(-1).clamp(min=0)
    if not symmetric:  # Z from the rounded scale
        assert torch.equal(z, torch.round(-8 - lo / s).clamp(-8, 7))
    else:
        assert torch.equal(s, (torch.maximum(-lo, hi) / 7).clamp(min=MIN_SCALE).clamp(min=torch.finfo(dtype).tiny)
                           .to(dtype).float())  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 4, "method": "fp8"}, r"method='fp8' \(E4M3\) has 8 bits and no zero-point; got bits=4"),
        ({"bits": 8, "symmetric": False, "method": "fp8"}, "symmetric=False"),
        ({"bits": 8, "method": "e5m2"}, r"method='e5m2' is not a grid; allowed: \['linear', 'fp8'\]"),
        ({"bits": 8, "scale_dtype": "half"}, "scale_dtype='half' is not supported"),
    ],
)
def test_grid_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_qparams(torch.randn(4, 8), axis=0, **kwargs)
