"""IterativePruning, QATFakeQuant and DistillationModule under FSDP.

On CPU: Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``) with two gloo processes
runs as a user would run it (``tests/fsdp.py``, one launch for every run). Lightning's ``FSDPStrategy`` (FSDP1) needs
CUDA ("The strategy `fsdp` requires a GPU accelerator"; torch's FSDP1 itself: "FSDP needs a non-CPU accelerator
device"), so its tests are under the ``gpu`` marker. Every run is compared with a run whose parameters are whole: one
process seeing the same samples, or DDP where activation observers make data parallelism differ from one process
(each rank's forward quantizes with the ranges all-reduced up to the previous step).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_compress.nn.distributed import full_tensor, is_sharded, local_like
from tests import fsdp

ROOT = Path(__file__).resolve().parents[1]


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested dicts / lists / tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def launch(out: Path, *args: str) -> list[dict[str, Any]]:
    """Run ``python -m tests.fsdp OUT ARGS`` (Lightning starts the second process); each rank's results."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.fsdp", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    files = sorted(out.glob("results_*.pt"))
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    found = launch(tmp_path_factory.mktemp("fsdp2"))
    assert len(found) == 2
    return found


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reference")
    return {
        "weight_only": fsdp.fit(fsdp.Net(), fsdp.compress_callbacks(act_bits=None), 1, root / "c"),
        "distill": fsdp.fit(fsdp.distill_module(), [], 1, root / "d"),
    }


# ---------------------------------------------------------------------------------------- helpers, no process group
def test_local_like_and_full_tensor_of_whole_tensors():
    """Without sharding both are the identity; a full tensor of another shape is refused, naming both shapes."""
    w, mask = torch.randn(5, 3), torch.rand(5, 3) > 0.5
    assert full_tensor(w) is w and local_like(mask, w) is mask and not is_sharded(w)
    with pytest.raises(ValueError, match=r"full has shape \(3, 5\); allowed: the shape of like, \(5, 3\)"):
        local_like(mask.T, w)


# ---------------------------------------------------------------------------------------- FSDP2 on CPU, 2 processes
@pytest.mark.slow
def test_fsdp2_masks_and_weights_equal_one_process(ranks, one_process):
    """Pruning (cubic, global ranking) and weight-only int4 QAT on sharded weights: masks, codes and every weight
    equal a one-process run on the same samples, and the masks are the same on both ranks."""
    got, ref = ranks[0]["weight_only"], one_process["weight_only"]
    assert_same(got["weights"], ref["weights"], "weights")
    assert_same(got["masks"], ref["masks"], "masks")
    assert_same(got["codes"], ref["codes"], "codes")
    assert_same(ranks[1]["weight_only"]["masks"], got["masks"], "rank 1 masks")
    kept = sum(int(m.sum()) for m in got["masks"].values()) / sum(m.numel() for m in got["masks"].values())
    assert kept == pytest.approx(0.25, abs=0.01)  # the ramp reached its target: the masks are not all ones
    for name, mask in got["masks"].items():  # pruned weights are exactly zero (the last weight has a 3 + 2 split)
        assert torch.all(got["weights"][name][~mask] == 0), name


@pytest.mark.slow
def test_fsdp2_observer_ranges_all_reduced_equal_ddp(ranks):
    """With int8 activations (min-max observers, all-reduced each step), FSDP2 equals DDP (whole parameters, two
    processes) exactly: ranges, codes, masks, weights; both ranks hold the same ranges and callback state."""
    got, ref = ranks[0]["full"], ranks[0]["ddp"]
    for key in ("ranges", "codes", "masks", "weights", "qat"):
        assert_same(got[key], ref[key], key)
    assert_same(ranks[1]["full"]["ranges"], got["ranges"], "rank 1 ranges")
    assert_same(ranks[1]["full"]["qat"], got["qat"], "rank 1 QAT state")
    assert all(lo < hi and abs(lo) < float("inf") for lo, hi in got["ranges"].values())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_fsdp2_resume_equals_uninterrupted(ranks, fmt):
    """Resuming from the epoch-0 checkpoint (one file, or a folder of shards) ends exactly where the uninterrupted
    run ends: weights, masks, observer ranges, codes and both callbacks' state."""
    first, resumed = ranks[0][fmt], ranks[0][f"{fmt}_resumed"]
    assert_same(resumed, first, fmt)
    assert_same(first["weights"], ranks[0]["full" if fmt == "sharded" else "sharded"]["weights"], "full vs sharded")
    files = ranks[0][f"{fmt}_files"]
    assert files == ["<file>"] if fmt == "full" else {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= set(files)


@pytest.mark.slow
def test_fsdp2_qat_swaps_before_sharding(ranks):
    """The fake-quant layers are the ones sharded (callbacks' setup runs before configure_model); a model sharded
    before setup is refused, naming the layer and what is allowed."""
    assert ranks[0]["full"]["swapped"] == ["net.0", "net.2", "net.4"]
    error = ranks[0]["swap_error"]
    assert (
        "layer '0' is already sharded" in error
        and "apply fully_shard in the LightningModule's configure_model" in error
    )


@pytest.mark.slow
def test_fsdp2_distillation_equals_one_process_and_resumes(ranks, one_process):
    """DistillationModule shards the student in its configure_model; the student's weights equal a one-process run
    (AdamW with a stepped schedule), and resuming from the epoch-0 checkpoint ends at the same weights."""
    got = ranks[0]["distill"]["weights"]
    assert_same(got, one_process["distill"]["weights"], "distill")
    assert_same(ranks[0]["distill_resumed"]["weights"], got, "distill resumed")
    assert sorted(got) == sorted(one_process["distill"]["weights"]) and all(k.startswith("student.") for k in got)


# ---------------------------------------------------------------------------------------- FSDP1 (FSDPStrategy), CUDA
def check_fsdp1(found: list[dict[str, Any]], prune: bool) -> None:
    """Resumed == uninterrupted for both checkpoint formats and for distillation; QAT swapped before wrapping."""
    res = found[0]
    for fmt in ("full", "sharded"):
        assert_same(res[f"{fmt}_resumed"], res[fmt], fmt)
        assert res[fmt]["swapped"] == ["net.0", "net.2", "net.4"]
        assert ("masks" in res[fmt]) == prune
        assert_same(found[-1][fmt]["qat"], res[fmt]["qat"], "last rank QAT state")
    assert_same(res["full"]["weights"], res["sharded"]["weights"], "full vs sharded")
    assert_same(res["distill_resumed"]["weights"], res["distill"]["weights"], "distill resumed")


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp1_one_gpu_swap_before_wrap_and_resume(tmp_path):
    """Lightning's FSDPStrategy on one GPU (FSDP1 keeps whole parameters there): pruning, QAT and distillation
    fit and resume exactly from full and sharded checkpoints; the fake-quant layers are inside the FSDP units."""
    check_fsdp1(launch(tmp_path, "1"), prune=True)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two-process FSDPStrategy needs two GPUs (one per rank)")
def test_fsdp1_two_gpus_qat_and_distillation_resume(tmp_path):
    """FSDPStrategy on two GPUs (flattened shards): QAT (observer ranges all-reduced, conversion on whole weights)
    and distillation resume exactly; both ranks hold the same QAT state."""
    check_fsdp1(launch(tmp_path, "2"), prune=False)
