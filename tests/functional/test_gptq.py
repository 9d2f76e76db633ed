import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch

import lightning_compress.calibration.threads as threads_module
from lightning_compress.calibration.threads import PARALLEL_MIN_WORK, gptq_threads
from lightning_compress.functional.gptq import GPTQOptions, gptq_quantize, gptq_quantize_reference, hessian_update
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
    opts = GPTQOptions(bits=4, group_size=group_size, symmetric=symmetric, block_size=64)
    res = gptq_quantize(w, torch.eye(192), opts)
    assert torch.equal(res.weight, _rtn(w, 4, group_size, symmetric))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn_on_correlated_inputs(problem, bits, group_size):
    x, w, h = problem
    gptq = gptq_quantize(w, h, GPTQOptions(bits=bits, group_size=group_size))
    err_gptq, err_rtn = _out_err(x, w, gptq.weight), _out_err(x, w, _rtn(w, bits, group_size))
    assert err_gptq < 0.9 * err_rtn
    ordered = gptq_quantize(w, h, GPTQOptions(bits=bits, group_size=group_size, act_order=True, static_groups=True))
    assert _out_err(x, w, ordered.weight) < err_gptq  # strictly better on these uneven input scales


@pytest.mark.parametrize(
    ("group_size", "symmetric", "block_size", "act_order"),
    [
        (None, True, 128, False),
        (None, False, 40, False),
        (32, True, 128, False),
        (32, False, 40, False),
        (64, True, 40, False),
        (32, True, 40, True),
        (32, False, 40, True),
        (None, True, 40, True),
    ],
)
def test_blocked_solver_matches_unblocked_definition(problem, group_size, symmetric, block_size, act_order):
    # blocks of 40 columns: sub-blocks split at group starts, groups straddling blocks
    _, w, h = problem
    res = gptq_quantize(w, h, GPTQOptions(4, group_size, symmetric, act_order=act_order, block_size=block_size))
    opts = GPTQOptions(4, group_size, symmetric, act_order=act_order, block_size=w.shape[1])
    ref = gptq_quantize_reference(w, h, opts)
    assert (res.codes.double() == ref.codes).double().mean() > 0.995  # float32 vs float64: rare ties round apart


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"group_size": 32, "symmetric": False},
        {"group_size": 64, "act_order": True},
        {"group_size": 32, "act_order": True, "static_groups": True},
        {"bits": 3, "symmetric": False, "clip_search": True},
        {"group_size": 32, "clip_search": True},
    ],
)
def test_fast_solver_matches_reference(problem, kwargs):
    # blocks of 40: groups of 32 and 64 straddle them (the reference's pending update, the fast one's sub-blocks)
    _, w, h = problem
    opts = GPTQOptions(block_size=40, **kwargs)
    res, ref = gptq_quantize(w, h, opts), gptq_quantize_reference(w, h, opts)
    assert (res.codes == ref.codes).double().mean() > 0.995  # float32 vs float64: rare ties round apart
    torch.testing.assert_close(res.scale, ref.scale, rtol=1e-4, atol=1e-6)  # group qparams from float32 weights
    torch.testing.assert_close(res.zero_point, ref.zero_point)
    assert torch.equal(dequantize(ref.codes, ref.scale, ref.zero_point), ref.weight)
    assert res.damp == pytest.approx(ref.damp)  # mean(diag H), summed in another order
    unblocked = gptq_quantize_reference(w, h, dataclasses.replace(opts, block_size=w.shape[1]))
    assert (ref.codes == unblocked.codes).double().mean() > 0.999  # lazy blocks only reorder float64 sums


def test_reference_zeroes_dead_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 24, generator=g)
    x[:, 5] = 0
    w = torch.randn(8, 24, generator=g)
    ref = gptq_quantize_reference(w, hessian_update(None, x), GPTQOptions(bits=3, group_size=8, act_order=True))
    assert torch.all(ref.weight[:, 5] == 0) and torch.isfinite(ref.weight).all()


@pytest.mark.parametrize("threads", [None, gptq_threads])
def test_thread_count_restored(problem, threads):
    before = torch.get_num_threads()
    gptq_quantize(problem[1], problem[2], threads=threads)
    with pytest.raises(RuntimeError, match="Cholesky"):
        gptq_quantize(torch.randn(2, 2), torch.tensor([[1.0, 1e20], [1e20, 1.0]]), threads=threads)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs", [{}, {"group_size": 32, "act_order": True}])
def test_thread_policy_does_not_change_results(problem, kwargs):
    _, w, h = problem
    opts = GPTQOptions(**kwargs)
    plain, policed = gptq_quantize(w, h, opts), gptq_quantize(w, h, opts, threads=gptq_threads)
    for a, b in zip(plain, policed, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.fixture
def fake_threads(monkeypatch) -> dict[str, int]:
    """torch's thread count as a dict entry (6 to begin with), set and read through ``torch.*_num_threads``."""
    state = {"n": 6}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(n=n))
    return state


def test_gptq_threads_policy(fake_threads):
    with gptq_threads(0):  # the solve's loop of small ops: one thread
        assert fake_threads["n"] == 1
        with gptq_threads(PARALLEL_MIN_WORK):  # large: the count in force when the solve began
            assert fake_threads["n"] == 6
        with gptq_threads(PARALLEL_MIN_WORK - 1):
            assert fake_threads["n"] == 1
        assert fake_threads["n"] == 1
    assert fake_threads["n"] == 6
    with gptq_threads(PARALLEL_MIN_WORK):  # outside a solve: the count as set
        assert fake_threads["n"] == 6


def test_solver_enters_the_policy_around_its_operations(problem, fake_threads, monkeypatch):
    monkeypatch.setattr(threads_module, "PARALLEL_MIN_WORK", 10**5)
    seen = []

    @contextlib.contextmanager
    def recording(work: int) -> Iterator[None]:
        with gptq_threads(work):
            seen.append((work, fake_threads["n"]))
            yield

    gptq_quantize(problem[1], problem[2], GPTQOptions(block_size=40), threads=recording)  # (64, 128), blocks of 40
    works = [0, 128**3 // 6, 0, 40 * 40 * 64, 80 * 40 * 64, 120 * 8 * 64]  # solve, Cholesky, each block's product
    assert seen == [(work, 6 if work >= 10**5 else 1) for work in works]
    assert fake_threads["n"] == 6


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
    res = gptq_quantize(w, h, GPTQOptions(bits=bits, **kwargs))
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
    res = gptq_quantize(w, h, GPTQOptions(group_size=32, act_order=True, static_groups=True))
    scale, zero_point = compute_qparams(w, 4, group_size=32)
    assert torch.equal(res.scale, scale) and torch.equal(res.zero_point, zero_point)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_and_rank_deficient_hessian(symmetric, act_order):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 96, generator=g)  # 48 tokens < 96 inputs: H has rank 48
    x[:, 5] = 0
    w = torch.randn(16, 96, generator=g)
    opts = GPTQOptions(bits=3, group_size=32, symmetric=symmetric, act_order=act_order)
    res = gptq_quantize(w, hessian_update(None, x), opts)
    assert torch.isfinite(res.weight).all()
    assert torch.all(res.weight[:, 5] == 0)
    assert torch.equal(dequantize(res.codes, res.scale, res.zero_point), res.weight)


def test_indefinite_hessian_warns_and_stays_finite():
    h = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # eigenvalues 3, 1, -1
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="not positive definite"):
        res = gptq_quantize(w, h, GPTQOptions(percdamp=0.0))
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
        ({"options": GPTQOptions(group_size=5)}, "group_size"),
        ({"hessian": torch.eye(7)}, "hessian"),
        ({"weight": torch.randn(8)}, "weight"),
        ({"keep": torch.ones(4, 8)}, "keep must be a bool tensor"),
        ({"keep": torch.ones(4, 4, dtype=torch.bool)}, r"keep must be a bool tensor of the weight's shape \(4, 8\)"),
    ],
)
def test_validation(kwargs, match):
    args = {"weight": torch.randn(4, 8), "hessian": torch.eye(8)} | kwargs
    with pytest.raises(ValueError, match=match):
        gptq_quantize(**args)
    with pytest.raises(ValueError, match=match):
        gptq_quantize_reference(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"percdamp": -0.1}, "percdamp"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_option_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTQOptions(**kwargs)


@pytest.mark.parametrize(
    ("field", "bad", "error", "match"),
    [
        ("bits", 9, ValueError, r"bits must be in \[2, 8\], got 9"),
        ("bits", 4.0, TypeError, r"bits must be an int in \[2, 8\], got 4.0"),
        ("group_size", 0, ValueError, "group_size must be a positive int or None, got 0"),
        ("group_size", True, ValueError, "group_size must be a positive int or None, got True"),
        ("group_size", 8.0, ValueError, "group_size must be a positive int or None, got 8.0"),
        ("symmetric", 1, ValueError, r"symmetric must be a bool \(True or False\), got 1"),
        ("act_order", "yes", ValueError, r"act_order must be a bool \(True or False\), got 'yes'"),
        ("static_groups", None, ValueError, r"static_groups must be a bool \(True or False\), got None"),
        ("percdamp", -0.1, ValueError, "percdamp must be a number >= 0, got -0.1"),
        ("percdamp", True, ValueError, "percdamp must be a number >= 0, got True"),
        ("percdamp", float("nan"), ValueError, "percdamp must be a number >= 0, got nan"),
        ("block_size", 0, ValueError, "block_size must be a positive int, got 0"),
        ("block_size", 64.0, ValueError, "block_size must be a positive int, got 64.0"),
    ],
)
def test_options_are_frozen_and_validate_each_field(field, bad, error, match):
    opts = GPTQOptions()
    assert opts == GPTQOptions(4, None, True, False, False, 0.01, 128)  # the defaults, in field order
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, field, bad)
    with pytest.raises(error, match=match):
        GPTQOptions(**{field: bad})
    with pytest.raises(TypeError, match="options must be a GPTQOptions or None, got dict"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), {field: bad})


@pytest.mark.parametrize("bits", [3, 4])
def test_clip_search_lowers_the_output_error_at_low_bits(problem, bits):
    x, w, h = problem
    w = w.clone()
    w[::7, 5] *= 6  # a few outlier weights: min-max wastes the grid on them
    plain = gptq_quantize(w, h, GPTQOptions(bits=bits, symmetric=False))
    clipped = gptq_quantize(w, h, GPTQOptions(bits=bits, symmetric=False, clip_search=True))
    assert _out_err(x, w, clipped.weight) < _out_err(x, w, plain.weight)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"symmetric": False},
        {"bits": 3, "symmetric": True, "act_order": True},
        {"group_size": 32, "symmetric": False, "act_order": True},  # group qparams taken during the solve
        {"group_size": 32, "act_order": True, "static_groups": True, "clip_search": True},
    ],
)
def test_held_zeros_stay_zero_and_match_the_reference(problem, kwargs):
    # a 2:4-pruned weight: GPTQ keeps every zero, compensates through the kept weights, as the reference does
    x, w, h = problem
    keep = (w.abs().reshape(64, 32, 4).argsort(-1, descending=True).argsort(-1) < 2).reshape(64, 128)
    pruned = w * keep
    opts = GPTQOptions(block_size=40, **kwargs)
    res, ref = gptq_quantize(pruned, h, opts, keep=keep), gptq_quantize_reference(pruned, h, opts, keep=keep)
    assert bool((res.weight[~keep] == 0).all()) and bool((ref.weight[~keep] == 0).all())
    assert (res.codes == ref.codes).double().mean() > 0.995
    torch.testing.assert_close(res.scale, ref.scale, rtol=1e-4, atol=1e-6)
    # the zeros' freedom is given up, nothing else: a plain GPTQ fills them in (and has the lower error)
    free = gptq_quantize(pruned, h, opts)
    assert bool((free.weight[~keep] != 0).any())
    errors = [_out_err(x, pruned, q) for q in (free.weight, res.weight, _masked_rtn(pruned, keep, opts))]
    assert errors == sorted(errors)


def _masked_rtn(w: torch.Tensor, keep: torch.Tensor, opts: GPTQOptions) -> torch.Tensor:
    return _rtn(w, opts.bits, opts.group_size, opts.symmetric) * keep


def test_keep_without_zeros_is_plain_gptq(problem):
    _, w, h = problem
    opts = GPTQOptions(bits=3, symmetric=False, act_order=True)
    held = gptq_quantize(w, h, opts, keep=torch.ones_like(w, dtype=torch.bool))
    assert torch.equal(held.codes, gptq_quantize(w, h, opts).codes)


# ------------------------------------------------------------------------------------------------ FP8 grid
def _rtn_fp8(w: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    axis = 0 if group_size is None else None
    scale, zero = compute_qparams(w, 8, True, axis=axis, group_size=group_size, method="fp8")
    return dequantize(quantize(w, scale, zero, 8, "fp8"), scale, zero)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"act_order": True}, {"group_size": 32, "act_order": True, "static_groups": True}, {"group_size": 64}],
)
def test_fp8_grid_fast_solver_matches_reference_and_beats_rtn(problem, kwargs):
    x, w, h = problem
    opts = GPTQOptions(bits=8, method="fp8", block_size=40, **kwargs)
    res, ref = gptq_quantize(w, h, opts), gptq_quantize_reference(w, h, opts)
    assert res.codes.dtype == ref.codes.dtype == torch.float8_e4m3fn
    assert (res.codes.float() == ref.codes.float()).double().mean() > 0.995  # float32 vs float64 ties
    assert torch.equal(res.weight, res.codes.float() * res.scale.repeat_interleave(128 // res.scale.shape[1], 1))
    assert torch.equal(res.zero_point, torch.zeros_like(res.scale))
    assert res.codes.float().abs().max() <= 448  # on the E4M3 grid, saturated
    assert _out_err(x, w, res.weight) < 0.9 * _out_err(x, w, _rtn_fp8(w, kwargs.get("group_size")))


def test_identity_hessian_on_the_fp8_grid_is_round_to_nearest():
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))
    res = gptq_quantize(w, torch.eye(96), GPTQOptions(bits=8, method="fp8"))
    assert torch.equal(res.weight, _rtn_fp8(w))


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kwargs", [{"symmetric": True}, {"symmetric": False, "clip_search": True}])
def test_scale_dtype_solves_on_scales_that_dtype_holds(problem, scale_dtype, kwargs):
    _, w, h = problem
    dtype = getattr(torch, scale_dtype)
    opts = GPTQOptions(bits=4, group_size=32, scale_dtype=scale_dtype, **kwargs)
    for res in gptq_quantize(w, h, opts), gptq_quantize_reference(w, h, opts):
        assert torch.equal(res.scale.to(dtype).float(), res.scale)  # every scale a value of that dtype
        assert torch.equal(dequantize(res.codes, res.scale.to(dtype).float(), res.zero_point), res.weight)
    # dynamic groups too: their qparams are taken during the solve
    dynamic = gptq_quantize(w, h, GPTQOptions(bits=4, group_size=32, act_order=True, scale_dtype=scale_dtype))
    assert torch.equal(dynamic.scale.to(dtype).float(), dynamic.scale)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 4, "method": "fp8"}, r"method='fp8'.*bits=4"),
        ({"bits": 8, "method": "fp8", "symmetric": False}, r"method='fp8'.*symmetric=False"),
        ({"method": "nf4"}, r"method='nf4' is not a grid; allowed: \['linear', 'fp8'\]"),
        ({"scale_dtype": "float8"}, r"scale_dtype='float8' is not supported; allowed: None or \['float16'"),
    ],
)
def test_grid_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTQOptions(**kwargs)
