"""Two-process FSDP2 runs on CPU (gloo) for ``tests/test_fsdp.py``, and their one-process references.

``python -m tests.fsdp OUT`` runs Lightning's ``ModelParallelStrategy`` (FSDP2: every Linear and the network
``fully_shard``-ed in ``configure_model``) with ``accelerator="cpu", devices=2``; Lightning's launcher starts the
second process by re-running this command line, as it does for a user's script. It fits, resumes and saves what the
tests compare (whole weights, masks, observer ranges, callback state) as ``OUT/<name>.pt`` from rank 0.

Rank ``r`` reads the samples ``r, r + 2, r + 4, ...`` in order (:class:`RankSampler`). The one-process reference
sees the same samples: rank ``r``'s ``k``-th batch is the ``2k + r``-th batch of :func:`interleaved`, and
``accumulate_grad_batches=2`` sums ``g_0 / 2 + g_1 / 2``, which equals FSDP2's averaged gradient exactly (halving is
exact in floating point, and a sum of two terms does not depend on their order).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, Subset, TensorDataset

from lightning_compress import DistillationModule, IterativePruning, QATFakeQuant
from lightning_compress.nn.distributed import full_tensor
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.observers import MinMaxObserver

SAMPLES, BATCH, EPOCHS, WORLD = 64, 4, 2, 2


def dataset() -> TensorDataset:
    """64 samples of 16 features in 5 classes, the same in every process."""
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(SAMPLES, 16, generator=g), torch.randint(0, 5, (SAMPLES,), generator=g))


class RankSampler(Sampler[int]):
    """The indices ``rank, rank + 2, ...`` of this process, read when iterated (the group exists by then)."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(torch.distributed.get_rank(), SAMPLES, WORLD))

    def __len__(self) -> int:
        return SAMPLES // WORLD


def interleaved(data: TensorDataset) -> Subset:
    """``data`` reordered so one process's consecutive batch pairs are the two ranks' batches of one step."""
    per_rank = [list(range(r, SAMPLES, WORLD)) for r in range(WORLD)]
    order = [i for k in range(0, SAMPLES // WORLD, BATCH) for rank in per_rank for i in rank[k : k + BATCH]]
    return Subset(data, order)


def shard(model: nn.Module, mesh: Any) -> None:
    """``fully_shard`` every Linear of ``model`` (fake-quant ones included), then ``model`` itself."""
    from torch.distributed.fsdp import fully_shard

    for layer in [m for m in model.modules() if isinstance(m, nn.Linear)]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def mlp(seed: int, width: int = 32) -> nn.Sequential:
    """16 -> width -> width -> 5 (the last layer's 5 rows shard unevenly over two ranks: 3 and 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))


class Net(pl.LightningModule):
    """The MLP, SGD with momentum (so pruning must zero optimizer state), sharded under ModelParallelStrategy."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def compress_callbacks(act_bits: int | None = 8, prune: bool = True) -> list[pl.Callback]:
    """Global magnitude pruning on a cubic ramp (masks change during the run) and int4 QAT, with int8 activations
    observed by min-max observers (``act_bits=8``) or weight-only."""
    qat = QATFakeQuant(bits=4, act_bits=act_bits, observer=MinMaxObserver())
    pruning = IterativePruning(sparsity=0.75, schedule="cubic", begin_step=0, end_step=12, frequency=4)
    return [pruning, qat] if prune else [qat]


def distill_module() -> DistillationModule:
    """A 16-wide student learning from a frozen 32-wide teacher, AdamW with warmup (a stepped scheduler)."""
    return DistillationModule(mlp(1, width=16), mlp(2), temperature=2.0, alpha=0.5, lr=1e-2)


def trainer(
    devices: int,
    root: Path,
    sharded: bool = False,
    extra: list[pl.Callback] | None = None,
    strategy: Any = None,
    accelerator: str = "cpu",
) -> pl.Trainer:
    """A Trainer under ``strategy`` (for ``devices=2`` by default ModelParallelStrategy: FSDP2, checkpoints sharded or
    full; its samples fixed by RankSampler, where Lightning's sampler would shuffle), or with ``devices=1`` and no
    strategy the one-process reference (accumulating two batches per step); a checkpoint after every epoch."""
    kwargs: dict[str, Any] = {"accumulate_grad_batches": 2}
    if devices > 1 or strategy is not None:
        strategy = ModelParallelStrategy(2, 1, save_distributed_checkpoint=sharded) if strategy is None else strategy
        kwargs = {"strategy": strategy, "use_distributed_sampler": False}
    save = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    return pl.Trainer(
        accelerator=accelerator, devices=devices, max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*(extra or []), save], default_root_dir=root, **kwargs,
    )  # fmt: skip


def clean(name: str) -> str:
    """``name`` without FSDP1's wrapper segments."""
    return name.replace("._fsdp_wrapped_module", "")


def summary(model: nn.Module, callbacks: list[pl.Callback], run: pl.Trainer | None = None) -> dict[str, Any]:
    """What the tests compare, whole (sharded weights all-gathered: call it on every rank)."""
    whole = contextlib.nullcontext()
    if run is not None and isinstance(run.strategy, FSDPStrategy):  # FSDP1: flattened shards between steps
        from torch.distributed.fsdp import FullyShardedDataParallel

        whole = FullyShardedDataParallel.summon_full_params(run.strategy.model)
    with whole:
        weights = {clean(n): full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters()}
    out: dict[str, Any] = {"weights": weights}
    for cb in callbacks:
        if isinstance(cb, IterativePruning):
            out["masks"] = {k: v.cpu().clone() for k, v in cb.masks.items()}
            out["pruning"] = cb.state_dict()
        if isinstance(cb, QATFakeQuant):
            out["qat"] = cb.state_dict()
            out["ranges"] = {
                n: (float(layer.act_quantizer.observer.min_val), float(layer.act_quantizer.observer.max_val))
                for n, layer in cb.layers.items()
                if layer.act_quantizer is not None
            }
            out["codes"] = {n: q.weight.codes.cpu().clone() for n, q in cb.quantized.items()}
            out["swapped"] = sorted(clean(n) for n, m in model.named_modules() if is_fake_quant(m))
    return out


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], devices: int, root: Path, **kw: Any) -> dict:
    """Fit ``module`` on :func:`dataset` (interleaved for one process; ``ckpt_path`` in ``kw`` resumes)."""
    ckpt_path = kw.pop("ckpt_path", None)
    if (fmt := kw.pop("fsdp1", None)) is not None:  # a new strategy per Trainer
        kw["strategy"] = FSDPStrategy(auto_wrap_policy={nn.Linear}, state_dict_type=fmt)
    loader = DataLoader(dataset(), batch_size=BATCH, sampler=RankSampler())
    if devices == 1 and "strategy" not in kw:
        loader = DataLoader(interleaved(dataset()), batch_size=BATCH)
    run = trainer(devices, root, extra=callbacks, **kw)
    run.fit(module, loader, ckpt_path=ckpt_path)
    return summary(module, callbacks, run)


def sharded_swap_error() -> str:
    """The error QATFakeQuant raises on a model sharded before its setup."""
    from torch.distributed.device_mesh import init_device_mesh

    model = mlp(0)
    shard(model, init_device_mesh("cpu", (WORLD,)))
    try:
        QATFakeQuant(bits=8).swap(model)
    except ValueError as err:
        return str(err)
    return ""


def main(out: Path) -> None:
    """Every FSDP2 run of the tests, in one launch of two processes."""
    results: dict[str, Any] = {}
    for fmt, sharded in [("full", False), ("sharded", True)]:
        root = out / fmt
        results[fmt] = fit(Net(), compress_callbacks(), WORLD, root, sharded=sharded)
        first = root / "epoch=0.ckpt"
        results[f"{fmt}_resumed"] = fit(Net(), compress_callbacks(), WORLD, out / f"{fmt}_r", sharded=sharded,
                                        ckpt_path=first)  # fmt: skip
        results[f"{fmt}_files"] = sorted(p.name for p in first.iterdir()) if first.is_dir() else ["<file>"]
    results["distill"] = fit(distill_module(), [], WORLD, out / "distill")
    results["distill_resumed"] = fit(distill_module(), [], WORLD, out / "distill_r",
                                     ckpt_path=out / "distill" / "epoch=0.ckpt")  # fmt: skip
    results["ddp"] = fit(Net(), compress_callbacks(), WORLD, out / "ddp", strategy="ddp")  # whole parameters
    results["weight_only"] = fit(Net(), compress_callbacks(act_bits=None), WORLD, out / "weight_only")
    results["swap_error"] = sharded_swap_error()
    save(results, out)


def save(results: dict[str, Any], out: Path) -> None:
    """``OUT/results_<rank>.pt`` from every rank, then the process group closed on all of them together."""
    torch.save(results, out / f"results_{torch.distributed.get_rank()}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main_fsdp1(out: Path, devices: int) -> None:
    """Lightning's FSDPStrategy (FSDP1, CUDA only) on ``devices`` GPUs, each Linear its own FSDP unit: fit, then
    resume from the epoch-0 checkpoint, full and sharded. Pruning only on one GPU (FSDP1's flattened shards of
    several devices are refused); on two or more, QAT and distillation."""
    results: dict[str, Any] = {}
    prune = devices == 1
    for fmt in ("full", "sharded"):
        kw: dict[str, Any] = {"accelerator": "cuda", "fsdp1": fmt}
        results[fmt] = fit(Net(), compress_callbacks(prune=prune), devices, out / fmt, **kw)
        first = out / fmt / "epoch=0.ckpt"
        results[f"{fmt}_resumed"] = fit(Net(), compress_callbacks(prune=prune), devices, out / f"{fmt}_r",
                                        ckpt_path=first, **kw)  # fmt: skip
    kw = {"accelerator": "cuda", "fsdp1": "full"}
    results["distill"] = fit(distill_module(), [], devices, out / "distill", **kw)
    results["distill_resumed"] = fit(distill_module(), [], devices, out / "distill_r",
                                     ckpt_path=out / "distill" / "epoch=0.ckpt", **kw)  # fmt: skip
    save(results, out)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        main_fsdp1(Path(sys.argv[1]), int(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
