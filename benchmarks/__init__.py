"""Benchmarks: each module in REGISTRY measures side by side in one run and returns a markdown table.

Run all with ``python -m benchmarks`` (or ``./dev.sh bench``); ``python -m benchmarks NAME ...`` runs some.
Benchmarks are not tests: nothing here is timed by the test suite.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch

from lightning_compress.export.selfcheck import interleaved_ms


@dataclass
class Table:
    """A titled markdown table with optional notes under it."""

    title: str
    headers: Sequence[str]
    rows: list[Sequence[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """The table as markdown: a level-3 heading, the rows, then the notes."""
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |"]
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes] if self.notes else []
        return "\n".join(lines)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, timed A, B, C, A, B, C, ... so machine noise hits all alike (the export
    self-check's timer, :func:`lightning_compress.export.selfcheck.interleaved_ms`)."""
    return {k: ms / 1e3 for k, ms in interleaved_ms(fns, repeats, warmup).items()}


ISA_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_vnni", "avx512_bf16", "avx512f", "avx2")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: ``VmHWM``, the high-water mark of its own address space.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that across ``fork`` + ``exec``, so a worker started
    by ``subprocess`` reports at least its parent's peak (a benchmark parent that compared two checkpoints made every
    later worker read 1405 MB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def machine() -> str:
    """One line describing where the benchmark ran: CPU model, the ISA flags int8 / bf16 speed depends on (present
    or absent), threads, GPU and torch version."""
    cpu, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    isa = " ".join(f"{flag}{'+' if flag in flags else '-'}" for flag in ISA_FLAGS)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} (ISA: {isa}), {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def quiet() -> None:
    """Silence Lightning's and torch's per-run chatter in benchmark output."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def trainer(epochs: int, callbacks: list[pl.Callback], **kwargs: object) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoints, bars or summaries."""
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_accuracy(model: pl.LightningModule, dm: pl.LightningDataModule) -> float:
    """``test/acc`` of ``model`` on ``dm``'s test split."""
    return trainer(1, []).test(model, dm, verbose=False)[0]["test/acc"]


class StepTimer(pl.Callback):
    """Wall time from each batch's start to its end: forward, backward, every hook, the optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


PRETRAIN_EPOCHS = 10


@functools.lru_cache(maxsize=1)
def _fashion_dense() -> tuple[pl.LightningModule, pl.LightningDataModule, float]:
    from lightning_compress.examples.images import FashionMNISTDataModule
    from lightning_compress.examples.models import ImageClassifier, LeNet300

    dm = FashionMNISTDataModule(batch_size=128)
    pl.seed_everything(0)
    model = ImageClassifier(LeNet300(), lr=1e-3)
    trainer(PRETRAIN_EPOCHS, []).fit(model, dm)
    return model, dm, test_accuracy(model, dm)


def fashion_dense() -> tuple[pl.LightningModule, pl.LightningDataModule, float]:
    """A copy of LeNet-300-100 trained densely for PRETRAIN_EPOCHS on Fashion-MNIST (trained once per process),
    its datamodule and its test accuracy: the common starting point of the accuracy benchmarks."""
    model, dm, acc = _fashion_dense()
    return copy.deepcopy(model), dm, acc


def finetune(
    model: pl.LightningModule, dm: pl.LightningDataModule, epochs: int, callbacks: list[pl.Callback]
) -> tuple[float, float]:
    """Fine-tune ``model`` with ``callbacks`` (seeded alike for every method); returns (test accuracy, seconds)."""
    pl.seed_everything(1)
    t0 = time.perf_counter()
    trainer(epochs, callbacks).fit(model, dm)
    return test_accuracy(model, dm), time.perf_counter() - t0


def median_step_seconds(
    runs: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[], list[pl.Callback]]]],
    dm: pl.LightningDataModule,
    repeats: int,
    epochs: int,
) -> dict[str, float]:
    """Median seconds per training step of each ``name: (make_model, make_callbacks)``, fits interleaved
    (A, B, C, A, B, C, ...), the first 5 steps of every fit skipped as warm-up."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, (make_model, make_callbacks) in runs.items():
            pl.seed_everything(0)
            timer = StepTimer()
            trainer(epochs, [*make_callbacks(), timer], limit_val_batches=0).fit(make_model(), dm)
            times[name] += timer.times[5:]
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}
