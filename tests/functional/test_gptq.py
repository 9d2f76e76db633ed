import pytest
import torch

from lightning_compress.functional.gptq import gptq_quantize, hessian_update
from lightning_compress.functional.quant import compute_qparams, dequantize, quant_range, quantize


def _rtn(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    axis = 0 if group_size is None else None
    scale, zero_point = compute_qparams(w, bits, symmetric, axis=axis, group_size=group_size)
    return dequantize(quantize(w, scale, zero_point, bits), scale, zero_point)


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated inputs X = Z A (2048 tokens, 128 features), a 64x128 weight and H = 2 XᵀX."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g)
    x = x * torch.linspace(0.2, 3.0, 128)[torch.randperm(128, generator=g)]  # uneven input scales
    w = torch.randn(64, 128, generator=g)
    return x, w, hessian_update(None, x)


def _out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x.double() @ (w - q).double().T).norm())


@pytest.mark.parametrize("group_size", [None, 16, 96])
@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_is_round_to_nearest(group_size, symmetric):
    w = torch.randn(32, 192, generator=torch.Generator().manual_seed(1))
    # block 64 with groups of 96: a group straddling two blocks
    res = gptq_quantize(w, torch.eye(192), bits=4, group_size=group_size, symmetric=symmetric, block_size=64)
    assert torch.equal(res.weight, _rtn(w, 4, group_size, symmetric))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn_on_correlated_inputs(problem, bits, group_size):
    x, w, h = problem
    gptq = gptq_quantize(w, h, bits=bits, group_size=group_size)
    err_gptq, err_rtn = _out_err(x, w, gptq.weight), _out_err(x, w, _rtn(w, bits, group_size))
    assert err_gptq < 0.9 * err_rtn
    ordered = gptq_quantize(w, h, bits=bits, group_size=group_size, act_order=True, static_groups=True)
    assert _out_err(x, w, ordered.weight) < err_gptq  # strictly better on these uneven input scales


def _unblocked_gptq(w, h, bits, group_size, symmetric):
    """GPTQ as first published (errors spread through ``U``, the upper Cholesky factor of ``H⁻¹``), column by column
    in float64, no blocks: the definition that the blocked float32 solver (through the factor of ``H``) must match."""
    w, h = w.double().clone(), h.double() + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmin, qmax = quant_range(bits)
    codes = torch.empty_like(w)
    for i in range(w.shape[1]):
        if i % (group_size or w.shape[1]) == 0:
            scale, zero_point = compute_qparams(
                w[:, i : i + (group_size or w.shape[1])].float(), bits, symmetric, axis=0
            )
            s, z = scale[:, 0].double(), zero_point[:, 0].double()
        codes[:, i] = torch.round(w[:, i] / s + z).clamp(qmin, qmax)
        w[:, i + 1 :] -= torch.outer((w[:, i] - (codes[:, i] - z) * s) / u[i, i], u[i, i + 1 :])
    return codes


@pytest.mark.parametrize(
    ("group_size", "symmetric", "block_size", "act_order"),
    [
        (None, True, 128, False),
        (None, False, 40, False),
        (32, True, 128, False),
        (32, False, 40, False),
        (64, True, 40, False),
        (32, True, 40, True),
    ],
)
def test_blocked_solver_matches_unblocked_definition(problem, group_size, symmetric, block_size, act_order):
    # blocks of 40 columns: sub-blocks split at group starts, groups straddling blocks
    _, w, h = problem
    res = gptq_quantize(w, h, 4, group_size, symmetric, act_order=act_order, block_size=block_size)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    ref = _unblocked_gptq(w[:, perm], h[perm][:, perm], 4, group_size, symmetric)[:, torch.argsort(perm)]
    assert (res.codes.double() == ref).double().mean() > 0.995  # float32 vs float64: rare ties round apart


def test_thread_count_restored(problem):
    threads = torch.get_num_threads()
    gptq_quantize(problem[1], problem[2])
    with pytest.raises(RuntimeError, match="Cholesky"):
        gptq_quantize(torch.randn(2, 2), torch.tensor([[1.0, 1e20], [1e20, 1.0]]))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"group_size": 32},
        {"symmetric": False},
        {"group_size": 32, "symmetric": False, "block_size": 48},
        {"act_order": True},
        {"group_size": 32, "act_order": True, "static_groups": True},
        {"group_size": 32, "act_order": True},
    ],
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_dequantize_to_weight(problem, kwargs, bits):
    _, w, h = problem
    res = gptq_quantize(w, h, bits=bits, **kwargs)
    qmin, qmax = quant_range(bits)
    assert res.codes.dtype == torch.int8 and res.codes.shape == w.shape
    assert qmin <= res.codes.min() and res.codes.max() <= qmax
    assert torch.equal(dequantize(res.codes, res.scale, res.zero_point), res.weight)
    group_size = kwargs.get("group_size")
    if group_size is None:
        assert res.scale.shape == (64, 1)
    elif kwargs.get("static_groups") or not kwargs.get("act_order"):
        assert res.scale.shape == (64, 128 // group_size)
    else:  # act_order groups are scattered in the original order: per-column params
        assert res.scale.shape == (64, 128)
    assert res.zero_point.shape == res.scale.shape
    assert res.damp == pytest.approx(0.01 * h.diagonal().mean().item())


def test_static_groups_use_original_weight_qparams(problem):
    _, w, h = problem
    res = gptq_quantize(w, h, group_size=32, act_order=True, static_groups=True)
    scale, zero_point = compute_qparams(w, 4, group_size=32)
    assert torch.equal(res.scale, scale) and torch.equal(res.zero_point, zero_point)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_and_rank_deficient_hessian(symmetric, act_order):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 96, generator=g)  # 48 tokens < 96 inputs: H has rank 48
    x[:, 5] = 0
    w = torch.randn(16, 96, generator=g)
    res = gptq_quantize(w, hessian_update(None, x), bits=3, group_size=32, symmetric=symmetric, act_order=act_order)
    assert torch.isfinite(res.weight).all()
    assert torch.all(res.weight[:, 5] == 0)
    assert torch.equal(dequantize(res.codes, res.scale, res.zero_point), res.weight)


def test_indefinite_hessian_warns_and_stays_finite():
    h = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # eigenvalues 3, 1, -1
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="not positive definite"):
        res = gptq_quantize(w, h, percdamp=0.0)
    assert torch.isfinite(res.weight).all() and res.damp > 1.0
    assert torch.equal(dequantize(res.codes, res.scale, res.zero_point), res.weight)


def test_unfactorisable_hessian_raises():
    h = torch.tensor([[1.0, 1e20], [1e20, 1.0]])  # eigenvalue -1e20, far beyond 10 rounds of x10 dampening
    with pytest.raises(RuntimeError, match="Cholesky"):
        gptq_quantize(torch.randn(2, 2), h)


def test_hessian_update_is_a_running_sum():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 5, 8, generator=g), torch.randn(7, 8, generator=g)
    h = hessian_update(hessian_update(None, a), b)
    full = torch.cat([a.reshape(-1, 8), b]).double()
    assert h.dtype == torch.float64 and h.shape == (8, 8)
    torch.testing.assert_close(h, 2 * full.T @ full)
    with pytest.raises(ValueError, match="hessian"):
        hessian_update(h, torch.randn(2, 9))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"group_size": 5}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"hessian": torch.eye(7)}, "hessian"),
        ({"weight": torch.randn(8)}, "weight"),
        ({"percdamp": -0.1}, "percdamp"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_validation(kwargs, match):
    args = {"weight": torch.randn(4, 8), "hessian": torch.eye(8)} | kwargs
    with pytest.raises(ValueError, match=match):
        gptq_quantize(**args)
