import pytest
import torch

from lightning_compress.functional.quant import compute_qparams, fake_quantize
from lightning_compress.functional.smoothquant import (
    fold_into_linear,
    fold_into_norm,
    scale_weight,
    smoothing_factors,
    weight_absmax,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_worked_numbers():
    a, w = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0])
    assert torch.equal(smoothing_factors(a, w, alpha=0.5), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(smoothing_factors(a, w, alpha=1.0), a)
    torch.testing.assert_close(smoothing_factors(a, w, alpha=0.0), 1 / w)


@pytest.mark.parametrize(("kwargs", "name"), [({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha")])
def test_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        smoothing_factors(torch.ones(3), torch.ones(3), **kwargs)
    with pytest.raises(ValueError, match="weight_absmax"):
        smoothing_factors(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="s must"):
        scale_weight(torch.ones(2, 3), torch.ones(4))


def test_weight_absmax_over_qkv():
    q, k, v = torch.tensor([[1.0, -5.0]]), torch.tensor([[-3.0, 2.0], [0.5, 0.0]]), torch.tensor([[2.0, 1.0]])
    assert torch.equal(weight_absmax([q, k, v]), torch.tensor([3.0, 5.0]))
    with pytest.raises(ValueError, match="weights"):
        weight_absmax([q, torch.ones(2, 3)])


def test_zero_channels_finite():
    s = smoothing_factors(torch.tensor([0.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.isfinite(s).all() and (s > 0).all()


def test_layernorm_linear_fold_exact():
    torch.manual_seed(0)
    n_in, n_out = 64, 32
    ln, lin = torch.nn.LayerNorm(n_in), torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.normal_()
    x = torch.randn(256, n_in) * 3
    with torch.no_grad():
        ref = lin(ln(x))
        s = smoothing_factors(ln(x).abs().amax(0), weight_absmax([lin.weight]))
        g, b = fold_into_norm(ln.weight, ln.bias, s)
        out = torch.nn.functional.linear(
            torch.nn.functional.layer_norm(x, (n_in,), g, b), scale_weight(lin.weight, s), lin.bias
        )
    assert _rel(out, ref) < 1e-5


def test_linear_linear_linear_fold_exact():
    torch.manual_seed(0)
    l1, l2, l3 = torch.nn.Linear(16, 48), torch.nn.Linear(48, 40), torch.nn.Linear(40, 8)
    x = torch.randn(128, 16)
    with torch.no_grad():
        h1 = l1(x)
        ref = l3(l2(h1))
        s1 = smoothing_factors(h1.abs().amax(0), weight_absmax([l2.weight]), alpha=0.7)
        w1, b1 = fold_into_linear(l1.weight, l1.bias, s1)
        w2 = scale_weight(l2.weight, s1)
        h2 = torch.nn.functional.linear(torch.nn.functional.linear(x, w1, b1), w2, l2.bias)
        s2 = smoothing_factors(h2.abs().amax(0), weight_absmax([l3.weight]))
        w2, b2 = fold_into_linear(w2, l2.bias, s2)
        w3 = scale_weight(l3.weight, s2)
        out = torch.nn.functional.linear(
            torch.nn.functional.linear(torch.nn.functional.linear(x, w1, b1), w2, b2), w3, l3.bias
        )
    assert _rel(out, ref) < 1e-5
    assert fold_into_linear(l1.weight, None, s1)[1] is None
    assert fold_into_norm(torch.ones(4), None, torch.ones(4))[1] is None


def _w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    wq = fake_quantize(w, compute_qparams(w, 8, axis=0).scale, None, 8)
    xs, xz = compute_qparams(x, 8, symmetric=False)
    return fake_quantize(x, xs, xz, 8) @ wq.T


def test_smoothing_beats_naive_w8a8_with_outliers():
    torch.manual_seed(0)
    x = torch.randn(2048, 256)
    x[:, [3, 70, 150, 201]] *= 100
    w = torch.randn(128, 256) * 0.05
    ref = x @ w.T
    naive = _rel(_w8a8(x, w), ref)
    s = smoothing_factors(x.abs().amax(0), weight_absmax([w]), alpha=0.5)
    smooth = _rel(_w8a8(x / s, scale_weight(w, s)), ref)
    # seed 0: naive 0.068, smoothed 0.0124 (5.5x); over seeds 0-7 the ratio was 4.6x-5.8x, so 4x holds for all
    assert smooth * 4 < naive, (naive, smooth)
