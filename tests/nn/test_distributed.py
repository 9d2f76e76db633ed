"""The collective helper: the same numbers in one process (a no-op) and across 2 gloo processes."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_compress.nn.distributed import all_reduce_, all_reduce_many_, broadcast_, is_distributed, is_rank_zero


def test_without_a_process_group_every_call_is_a_no_op():
    t = torch.tensor([1.0, -2.0])
    assert not is_distributed() and is_rank_zero()
    assert all_reduce_(t, "mean") is t and torch.equal(t, torch.tensor([1.0, -2.0]))
    assert torch.equal(broadcast_(torch.tensor([True])), torch.tensor([True]))
    with pytest.raises(ValueError, match="op='avg' is not supported"):
        all_reduce_(t, "avg")


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = torch.tensor([1.0, 4.0]) * (rank + 1)  # rank 0: [1, 4], rank 1: [2, 8]
        got = {op: all_reduce_(x.clone(), op).tolist() for op in ("sum", "mean", "min", "max")}
        many = [torch.tensor(rank + 1, dtype=torch.int64), torch.tensor([0.5]) * (rank + 1)]
        all_reduce_many_(many, "max")
        mask = broadcast_(torch.tensor([rank == 0, rank == 1]))
        out[rank] = {**got, "many": [many[0].item(), many[1].tolist()], "mask": mask.tolist(), "zero": is_rank_zero()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_agree():
    port = 29500 + torch.randint(0, 1000, ()).item()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        r = results[rank]
        assert r["sum"] == [3.0, 12.0] and r["mean"] == [1.5, 6.0] and r["min"] == [1.0, 4.0] and r["max"] == [2.0, 8.0]
        assert r["many"] == [2, [1.0]] and r["mask"] == [True, False] and r["zero"] == (rank == 0)
