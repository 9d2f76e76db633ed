import io

import pytest
import torch
from torch import nn

from lightning_compress.functional.quant import fake_quantize, qparams_from_range
from lightning_compress.nn.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    calibrating,
    sync_observers,
)

KINDS = [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver]


def batches(n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, generator=g) * (i + 1) + i for i in range(n)]


def fq_mse(x: torch.Tensor, obs: Observer, bits: int) -> float:
    scale, zero_point = obs.qparams(bits)
    return float((fake_quantize(x, scale.reshape(1), zero_point.reshape(1), bits) - x).square().mean())


def two_rank_all_reduce(local: Observer, other: Observer):
    """Fake all-reduce over 2 ranks: combines each of ``local``'s buffers with ``other``'s buffer of the same name."""
    names = {buf.data_ptr(): name for name, buf in local.named_buffers()}
    ops = {"min": torch.minimum, "max": torch.maximum, "mean": lambda a, b: (a + b) / 2}

    def all_reduce_many(tensors: list[torch.Tensor], op: str) -> None:
        for t in tensors:
            t.copy_(ops[op](t, getattr(other, names[t.data_ptr()])))

    return all_reduce_many


def test_minmax_is_exact_running_range():
    obs, xs = MinMaxObserver(), batches()
    for x in xs:
        assert obs(x) is x
    everything = torch.cat([x.flatten() for x in xs])
    assert obs.min_val == everything.min() and obs.max_val == everything.max()
    assert int(obs.num_batches) == len(xs)


def test_ema_matches_recurrence_exactly():
    c, obs, xs = 0.3, MovingAverageMinMaxObserver(averaging_constant=0.3), batches()
    lo, hi = xs[0].min(), xs[0].max()
    for x in xs[1:]:
        lo, hi = lo + c * (x.min() - lo), hi + c * (x.max() - hi)
    for x in xs:
        obs(x)
    assert obs.min_val == lo and obs.max_val == hi


@pytest.mark.parametrize("percentile", [99.99, 99.0, 90.0, 100.0])
def test_percentile_matches_torch_quantile(percentile):
    x = torch.randn(37, 251, generator=torch.Generator().manual_seed(1))
    obs = PercentileObserver(percentile=percentile)
    obs(x)
    q = torch.tensor([1 - percentile / 100, percentile / 100], dtype=torch.float64)  # float32 q is off by 1e-8
    lo, hi = torch.quantile(x.flatten().double(), q).float()
    torch.testing.assert_close(obs.min_val, lo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(obs.max_val, hi, rtol=1e-6, atol=1e-6)


def test_percentile_ignores_outliers():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    x[:5] = 1000.0
    obs = PercentileObserver(percentile=99.9)
    obs(x)
    assert obs.max_val < 5 and obs.min_val > -5


def laplace(n: int = 20_000) -> torch.Tensor:
    """Laplace(0, 1) samples by inverse CDF: heavy tails, max ~ ln(n)."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(3)) - 0.5
    return -u.sign() * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("bits", [4, 6])
def test_mse_clips_heavy_tails_and_beats_minmax(bits):
    # (A few isolated 100x outliers are not clipped by an MSE search: clipping them costs more than it saves.)
    x = laplace()
    mse, minmax = MSEObserver(bits=bits), MinMaxObserver()
    mse(x), minmax(x)
    alpha = float(mse.max_val / x.max())
    assert alpha < 0.9
    torch.testing.assert_close(mse.min_val, alpha * x.min())  # one alpha scales both ends
    assert fq_mse(x, mse, bits) < 0.9 * fq_mse(x, minmax, bits)


def test_mse_keeps_uniform_range():
    x = torch.rand(20_000, generator=torch.Generator().manual_seed(4)) * 2 - 1
    obs = MSEObserver(bits=8)
    obs(x)
    assert obs.max_val / x.max() >= 0.97 and obs.min_val / x.min() >= 0.97


def test_mse_qparams_must_match_construction():
    obs = MSEObserver(bits=4, symmetric=True)
    obs(torch.randn(100))
    assert obs.qparams(4, symmetric=True).zero_point == 0
    with pytest.raises(ValueError, match="bits=4"):
        obs.qparams(8)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_stops_updates(kind):
    obs = kind()
    obs(torch.randn(64))
    before = obs.observer_state()
    obs.freeze()
    obs(torch.randn(64) * 10)
    with calibrating(obs):
        obs.eval()(torch.randn(64) * 10)
    assert obs.min_val == before["min_val"] and obs.max_val == before["max_val"] and int(obs.num_batches) == 1
    obs.train().unfreeze()
    obs(torch.randn(64) * 10)
    assert int(obs.num_batches) == 2


def test_eval_observes_only_when_calibrating():
    model = nn.Sequential(nn.Linear(4, 4), MinMaxObserver()).eval()
    obs = model[1]
    model(torch.randn(3, 4))
    assert int(obs.num_batches) == 0
    with calibrating(model):
        y = model(torch.randn(3, 4))
    assert int(obs.num_batches) == 1 and obs.min_val == y.min() and obs.max_val == y.max()
    assert not obs.observing
    with obs.calibrate():
        obs(torch.randn(3))
    assert int(obs.num_batches) == 2 and not obs.observing
    with pytest.raises(ValueError, match="no Observer"), calibrating(nn.Linear(2, 2)):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_qparams_before_data_raises(kind):
    with pytest.raises(RuntimeError, match="has seen no data"):
        kind().qparams(8)


def test_qparams_equal_qparams_from_range():
    obs = MinMaxObserver()
    obs(torch.tensor([-1.0, 0.3, 2.0]))
    scale, zero_point = obs.qparams(8)
    ref_scale, ref_zero_point = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), 8, symmetric=False)
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero_point)
    assert zero_point.item() == -43


def test_sync_minmax_gives_global_range():
    rank0, rank1 = MinMaxObserver(), MinMaxObserver()
    rank0(torch.tensor([-1.0, 3.0]))
    rank1(torch.tensor([-2.0, 1.0]))
    rank1(torch.tensor([0.0]))
    assert rank0.reduce_ops() == {"min_val": "min", "max_val": "max"}
    sync_observers([rank0], two_rank_all_reduce(rank0, rank1))
    assert rank0.min_val == -2.0 and rank0.max_val == 3.0 and int(rank0.num_batches) == 2
    idle = MinMaxObserver()  # a rank that saw no batch converts to the global range after a sync
    sync_observers([idle], two_rank_all_reduce(idle, rank0))
    assert torch.equal(idle.qparams(8).scale, rank0.qparams(8).scale)


@pytest.mark.parametrize("kind", [MovingAverageMinMaxObserver, PercentileObserver, MSEObserver])
def test_sync_estimates_gives_mean(kind):
    rank0, rank1 = kind(), kind()
    rank0(torch.randn(256, generator=torch.Generator().manual_seed(5)))
    rank1(torch.randn(256, generator=torch.Generator().manual_seed(6)) * 3)
    assert rank0.reduce_ops() == {"min_val": "mean", "max_val": "mean"}
    expected = (rank0.min_val + rank1.min_val) / 2, (rank0.max_val + rank1.max_val) / 2
    sync_observers([rank0], two_rank_all_reduce(rank0, rank1))
    assert rank0.min_val == expected[0] and rank0.max_val == expected[1]


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip(kind):
    obs = kind()
    for x in batches(3):
        obs(x)
    obs.freeze()
    buffer = io.BytesIO()
    torch.save(obs.observer_state(), buffer)
    buffer.seek(0)
    fresh = kind()
    fresh.load_observer_state(torch.load(buffer))
    assert fresh.frozen and int(fresh.num_batches) == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.qparams(8), obs.qparams(8), strict=True))
    with pytest.raises(ValueError, match="keys"):
        fresh.load_observer_state({"min_val": torch.tensor(0.0)})


def test_observer_state_not_in_state_dict():
    model = nn.Sequential(nn.Linear(4, 4), MinMaxObserver())
    model(torch.randn(2, 4))
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    nn.Sequential(nn.Linear(4, 4)).load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_input_keeps_float32_statistics(kind):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    obs = kind().to(torch.bfloat16)  # a bf16-true model cast must not touch the statistics
    assert obs(x) is x
    ref = kind()
    ref(x.float())
    assert obs.min_val.dtype == obs.max_val.dtype == torch.float32
    assert obs.min_val == ref.min_val and obs.max_val == ref.max_val


def test_observer_validation():
    for bad in [
        lambda: PercentileObserver(percentile=40.0),
        lambda: MovingAverageMinMaxObserver(averaging_constant=0.0),
        lambda: MSEObserver(grid=0),
        lambda: MSEObserver(bits=9),
    ]:
        with pytest.raises(ValueError):
            bad()


def test_hydra_instantiates_observers_by_target():
    from hydra.utils import instantiate

    obs = instantiate({"_target_": "lightning_compress.nn.observers.PercentileObserver", "percentile": 99.0})
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.0
    ema = instantiate({"_target_": "lightning_compress.nn.observers.MovingAverageMinMaxObserver"})
    assert isinstance(ema, MovingAverageMinMaxObserver) and ema.averaging_constant == 0.01


def test_sync_observers_makes_one_collective_per_op_for_all_observers():
    observers = [MinMaxObserver(), MovingAverageMinMaxObserver(), MinMaxObserver()]
    for obs in observers:
        obs(torch.randn(8))
    calls = []
    sync_observers(observers, lambda tensors, op: calls.append((op, len(tensors))))
    assert sorted(calls) == [("max", 2 + 3), ("mean", 2), ("min", 2)]  # max: 2 max_val + 3 num_batches
