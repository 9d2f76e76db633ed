"""QAT's fused kernels (C++ on CPU) against the eager compositions they replace: bit-for-bit forward, equal
straight-through gradients, the same observer state, at rounding boundaries and in every float dtype."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_compress.functional import fused
from lightning_compress.functional.fused import (
    minmax_fake_quantize,
    observe_fake_quantize,
    observe_fake_quantize_input_and_weight,
)
from lightning_compress.functional.quant import compute_qparams, fake_quantize, qparams_from_range
from lightning_compress.nn.observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_the_cpu_kernels_build_here():
    # ./dev.sh test installs ninja and the machines have a C++ compiler: the fused path must really be the one tested
    assert fused._extension() is not None


def _with_boundaries(x: torch.Tensor, scale: float, zero: float) -> torch.Tensor:
    """``x`` plus values exactly at (and one ulp around) the rounding boundaries ``(k + 0.5 - Z) * S``."""
    k = torch.arange(-140, 140, dtype=torch.float32)
    edges = (k + 0.5 - zero) * scale
    near = torch.cat([edges, edges.nextafter(torch.tensor(math.inf)), edges.nextafter(torch.tensor(-math.inf))])
    return torch.cat([x.flatten(), near]).to(x.dtype)


def _eager_observe(x: torch.Tensor, observer: Observer, bits: int) -> torch.Tensor:
    observer.train()
    y = observer(x)
    s, z = observer.qparams(bits, symmetric=False)
    return fake_quantize(y, s, z, bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["minmax", "ema"])
@pytest.mark.parametrize("bits", [8, 4])
def test_observe_fake_quantize_is_the_observer_then_fake_quantize(dtype, kind, bits):
    torch.manual_seed(0)
    make = MinMaxObserver if kind == "minmax" else lambda: MovingAverageMinMaxObserver(averaging_constant=0.1)
    reference, state = make(), make()
    c = None if kind == "minmax" else 0.1
    for step in range(4):  # the first batch initialises, later ones update
        x = (torch.randn(3, 257) * (1 + step) + step).to(dtype)
        if step:  # values at this step's exact rounding boundaries
            s, z = qparams_from_range(reference.min_val, reference.max_val, bits, symmetric=False)
            x = _with_boundaries(x, float(s), float(z))
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = _eager_observe(xr, reference, bits)
        got = observe_fake_quantize(xf, state.min_val, state.max_val, state.num_batches, bits, c)
        assert got.dtype == dtype and torch.equal(got, expected)
        assert torch.equal(state.min_val, reference.min_val) and torch.equal(state.max_val, reference.max_val)
        assert int(state.num_batches) == int(reference.num_batches) == step + 1
        g = torch.randn_like(got)
        expected.backward(g)
        got.backward(g)
        assert torch.equal(xf.grad, xr.grad)
    clipped = bool((xf.grad == 0).any())  # g has no zeros: a zero gradient is a clipped value
    assert clipped == (kind == "ema")  # the running min / max covers every batch; the lagging EMA range does not


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "symmetric", "group_size"),
    [((64, 100), True, None), ((32, 16, 3, 3), True, None), ((48, 128), False, None), ((20, 256), True, 64),
     ((20, 4, 8, 2), False, 16)],
)  # fmt: skip
def test_minmax_fake_quantize_is_fake_quantize_of_min_max_scales(dtype, shape, symmetric, group_size):
    torch.manual_seed(1)
    w = (torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 3).to(dtype)
    w.view(shape[0], -1)[:, :5] = 0  # pruned weights stay exactly zero
    wr, wf = w.clone().requires_grad_(), w.clone().requires_grad_()
    s, z = compute_qparams(wr, 8, symmetric, axis=None if group_size else 0, group_size=group_size)
    expected = fake_quantize(wr, s, None if symmetric else z, 8)
    got = minmax_fake_quantize(wf, 8, symmetric, group_size)
    assert got.dtype == dtype and torch.equal(got, expected)
    g = torch.randn_like(got)
    expected.backward(g)
    got.backward(g)
    assert torch.equal(wf.grad, wr.grad)


def test_one_node_for_input_and_weight_equals_the_two_kernels_and_spares_the_input_gradient():
    torch.manual_seed(2)
    x, w = torch.randn(16, 32), torch.randn(8, 32, requires_grad=True)
    a, b = MinMaxObserver(), MinMaxObserver()
    xq, wq = observe_fake_quantize_input_and_weight(x, a.min_val, a.max_val, a.num_batches, 8, None, w, 8)
    assert not xq.requires_grad and wq.requires_grad  # the model's input needs no gradient
    assert torch.equal(xq, observe_fake_quantize(x, b.min_val, b.max_val, b.num_batches, 8, None))
    assert torch.equal(wq, minmax_fake_quantize(w, 8)) and torch.equal(a.max_val, b.max_val)
    with pytest.raises(ValueError, match="group_size=5 must divide the weight's row length 32"):
        minmax_fake_quantize(w, 8, group_size=5)


def test_the_eager_fallback_gives_the_same_numbers(monkeypatch):
    torch.manual_seed(3)
    x, w = torch.randn(4, 64) * 2, torch.randn(16, 64)
    states = [MovingAverageMinMaxObserver(0.2) for _ in range(2)]
    outputs = []
    for state, built in zip(states, (True, False), strict=True):
        if not built:
            monkeypatch.setattr(fused, "_extension", lambda: None)
        y = [observe_fake_quantize(x * k, state.min_val, state.max_val, state.num_batches, 8, 0.2) for k in (1, 3)]
        outputs.append([*y, minmax_fake_quantize(w, 4, False, 16)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
    assert torch.equal(states[0].min_val, states[1].min_val)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("smoothed", [False, True])
def test_row_quantization_and_rescale_equal_their_eager_compositions(monkeypatch, dtype, bits, smoothed):
    """The C++ per-token quantize (oneDNN's uint8 input, SmoothQuant's division fused) and rescale are bit for bit
    the eager compositions."""
    torch.manual_seed(0)
    x = (torch.randn(37, 300) * 3).to(dtype)
    x[3] = 0  # an all-zero token: the smallest scale
    smooth = torch.rand(300) * 3 + 0.1 if smoothed else None
    y, bias = torch.randn(37, 50), torch.randn(50)
    codes = fused.quantize_rows_u8(x, bits, smooth)
    built = [codes, fused.scale_rows(y, codes[1], bias, dtype)]
    monkeypatch.setattr(fused, "_extension", lambda: None)
    eager = [fused.quantize_rows_u8(x, bits, smooth), fused.scale_rows(y, codes[1], bias, dtype)]
    assert torch.equal(built[0][0], eager[0][0]) and torch.equal(built[0][1], eager[0][1])
    assert torch.equal(built[1], eager[1]) and built[1].dtype == dtype
    qmax = 2 ** (bits - 1) - 1
    xs = x if smooth is None else x / smooth.to(dtype)
    s = xs.float().abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    assert torch.equal(eager[0][0], (torch.round(xs.float() / s).clamp(-qmax - 1, qmax) + 128).to(torch.uint8))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lsq_equals_the_eager_lsq_forward_bit_for_bit_and_its_gradients(symmetric, group_size, dtype):
    from lightning_compress.functional.fused import fused_lsq_fake_quantize
    from lightning_compress.functional.quant import expand_params, lsq_fake_quantize

    torch.manual_seed(0)
    w = torch.randn(6, 32) + (0 if symmetric else 0.4)
    scale, zero = compute_qparams(w, 3, symmetric, axis=None if group_size else 0, group_size=group_size)
    scale = scale * 0.8  # some values clip
    z = None if symmetric else zero
    # a few weights exactly at (and one ulp around) a rounding boundary (k + 0.5 - Z) * S of their block
    s_full, z_full = expand_params(scale, w.shape), expand_params(zero if z is not None else torch.zeros(()), w.shape)
    edge = (torch.randint(-3, 3, w.shape).float() + 0.5 - z_full) * s_full
    pick = torch.rand(w.shape) < 0.1
    w = torch.where(pick, edge, w)
    w[:, :2] = w[:, :2].nextafter(torch.tensor(math.inf))
    w = w.to(dtype)
    upstream = torch.randn(w.shape).to(dtype)
    results = []
    for fn in (fused_lsq_fake_quantize, lsq_fake_quantize):
        x, s = w.clone().requires_grad_(), scale.clone().requires_grad_()
        y = fn(x, s, 3, z)
        y.backward(upstream)
        results.append((y, x.grad, s.grad))
    (y_f, gx_f, gs_f), (y_e, gx_e, gs_e) = results
    assert torch.equal(y_f, y_e) and torch.equal(gx_f, gx_e)
    assert torch.allclose(gs_f, gs_e, rtol=1e-4, atol=1e-5) and (gs_f != 0).any()
