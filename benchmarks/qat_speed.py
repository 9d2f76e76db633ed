"""QAT step time, side by side in one run: plain training, our QAT (W8A8 with the fused kernels and with eager ops,
int4 LSQ), and torch.ao's eager-mode QAT (``prepare_qat``: fused observer + fake-quant ATen kernels), on the default
model (SmallCNN on digits), fits interleaved.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

from benchmarks import Table, median_step_seconds, quiet
from lightning_compress import QATFakeQuant
from lightning_compress.examples.images import DigitsDataModule
from lightning_compress.examples.models import ImageClassifier, SmallCNN
from lightning_compress.functional import fused


def _torch_ao_model() -> pl.LightningModule:
    model = ImageClassifier(SmallCNN())
    model.net.qconfig = get_default_qat_qconfig("x86")
    prepare_qat(model.net, inplace=True)
    return model


class _EagerKernels(pl.Callback):
    """Runs a fit on the eager compositions instead of the fused C++ kernels (what a machine without a compiler
    gets), to show what the fusion buys."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved = fused._extension
        fused._extension = lambda: None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fused._extension = self._saved


def step_time_table(repeats: int = 7, epochs: int = 3) -> Table:
    """Median ms per training step of each variant, fits interleaved."""
    dm = DigitsDataModule()
    fused._extension()  # built (or loaded from the cache) before any timing
    runs = {
        "plain FP32": (lambda: ImageClassifier(SmallCNN()), lambda: []),
        "ours: QATFakeQuant W8A8 (fused kernels)": (
            lambda: ImageClassifier(SmallCNN()),
            lambda: [QATFakeQuant(bits=8, act_bits=8)],
        ),
        "ours: QATFakeQuant W8A8, eager ops (no compiler)": (
            lambda: ImageClassifier(SmallCNN()),
            lambda: [QATFakeQuant(bits=8, act_bits=8), _EagerKernels()],
        ),
        "ours: QATFakeQuant int4 LSQ (weights)": (
            lambda: ImageClassifier(SmallCNN()),
            lambda: [QATFakeQuant(bits=4, lsq=True)],
        ),
        "torch.ao prepare_qat (x86 qconfig, W8A8)": (_torch_ao_model, lambda: []),
    }
    med = median_step_seconds(runs, dm, repeats, epochs)
    table = Table(
        "QAT step time (SmallCNN on digits, batch 64, median over interleaved fits)",
        ["run", "ms / step", "vs plain"],
    )
    for name, t in med.items():
        table.rows.append([name, f"{1000 * t:.3f}", f"{t / med['plain FP32']:.2f}×"])
    table.notes.append(
        "A step = forward, backward and Adam step (batch start to batch end), the first 5 of each fit skipped. The "
        "fused kernels (lightning_compress.functional.fused) update the activation range and fake-quantize in one C++ "
        "pass, the weight's min-max scales and fake-quantize in another, under one autograd node per layer. Targets: "
        "issue #4, QAT <= 1.3× plain; issue #14, W8A8 <= 1.25× plain (the issue measured torch.ao at 1.41×)."
    )
    return table


def run() -> list[Table]:
    """The step-time table."""
    quiet()
    return [step_time_table()]
