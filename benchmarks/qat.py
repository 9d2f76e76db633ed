"""Quantization-aware training benchmarks, side by side in one run.

1. Step time on the default model (SmallCNN on digits): plain training, our QAT (W8A8 and int4 LSQ), and
   torch.ao's eager-mode QAT (``prepare_qat``, fused observer + fake-quant kernels), fits interleaved.
2. Fashion-MNIST / LeNet-300-100, every row from the same dense model: FP32 fine-tuning, int8 QAT (W8A8),
   int4 QAT (LSQ), int4 post-training round-to-nearest (no training).
3. Deep Compression on the same model: prune (3 rounds to 92%) -> 5-bit k-means with centroid fine-tuning ->
   Huffman coding, with the real size after every stage.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

from benchmarks import PRETRAIN_EPOCHS, StepTimer, Table, fashion_dense, finetune, quiet, test_accuracy, trainer
from lightning_compress import IterativePruning, QATFakeQuant
from lightning_compress.data import DigitsDataModule
from lightning_compress.functional.quant import compute_qparams, fake_quantize
from lightning_compress.models import ImageClassifier, SmallCNN
from lightning_compress.summary import stage_sizes

QAT_EPOCHS = 3


def _torch_ao_model() -> pl.LightningModule:
    model = ImageClassifier(SmallCNN())
    model.net.qconfig = get_default_qat_qconfig("x86")
    prepare_qat(model.net, inplace=True)
    return model


def step_time_table(repeats: int = 7, epochs: int = 3) -> Table:
    """Median ms per training step of each variant, fits interleaved."""
    dm = DigitsDataModule()
    runs = {
        "plain FP32": (lambda: ImageClassifier(SmallCNN()), lambda: []),
        "ours: QATFakeQuant W8A8": (lambda: ImageClassifier(SmallCNN()), lambda: [QATFakeQuant(bits=8, act_bits=8)]),
        "ours: QATFakeQuant int4 LSQ (weights)": (
            lambda: ImageClassifier(SmallCNN()),
            lambda: [QATFakeQuant(bits=4, lsq=True)],
        ),
        "torch.ao prepare_qat (x86 qconfig, W8A8)": (_torch_ao_model, lambda: []),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, (make_model, callbacks) in runs.items():
            pl.seed_everything(0)
            timer = StepTimer()
            trainer(epochs, [*callbacks(), timer], limit_val_batches=0).fit(make_model(), dm)
            times[name] += timer.times[5:]
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    table = Table(
        "QAT step time (SmallCNN on digits, batch 64, median over interleaved fits)",
        ["run", "ms / step", "vs plain"],
    )
    for name, t in med.items():
        table.rows.append([name, f"{1000 * t:.3f}", f"{t / med['plain FP32']:.2f}×"])
    table.notes.append("Target (issue #4): our QAT <= 1.3× plain.")
    return table


@torch.no_grad()
def _round_to_nearest(model: pl.LightningModule, bits: int) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            scale, zero_point = compute_qparams(module.weight, bits, axis=0)
            module.weight.copy_(fake_quantize(module.weight, scale, zero_point, bits))


def accuracy_table() -> tuple[Table, Table]:
    """Fashion-MNIST accuracy of QAT and PTQ, and Deep Compression's stages."""
    _, dm, pretrained = fashion_dense()
    rows: dict[str, float] = {}
    for name, callbacks in {
        "FP32 (fine-tuned)": [],
        "int8 QAT (W8A8)": [QATFakeQuant(bits=8, act_bits=8)],
        "int4 QAT (weights, LSQ per channel)": [QATFakeQuant(bits=4, lsq=True)],
    }.items():
        model, _, _ = fashion_dense()
        rows[name] = finetune(model, dm, QAT_EPOCHS, callbacks)[0]
    model, _, _ = fashion_dense()
    _round_to_nearest(model, 4)
    rows["int4 post-training round-to-nearest"] = test_accuracy(model, dm)
    fp32 = rows["FP32 (fine-tuned)"]
    table = Table(
        f"Quantization accuracy, LeNet-300-100 on Fashion-MNIST ({PRETRAIN_EPOCHS} dense epochs, then "
        f"{QAT_EPOCHS} epochs per row)",
        ["model", "test acc", "Δ vs FP32 (points)"],
    )
    for name, acc in rows.items():
        table.rows.append([name, f"{acc:.2%}", f"{100 * (acc - fp32):+.2f}"])
    ptq_drop = fp32 - rows["int4 post-training round-to-nearest"]
    qat_drop = fp32 - rows["int4 QAT (weights, LSQ per channel)"]
    recovered = 1 - qat_drop / ptq_drop if ptq_drop > 0 else float("nan")
    table.notes += [
        f"Pre-trained dense model before fine-tuning: {pretrained:.2%}. int4 QAT recovers {recovered:.0%} of the "
        "int4 post-training drop.",
        "Targets (issue #4): int8 within 0.3 point of FP32; int4 QAT recovers at least half of the PTQ drop.",
    ]
    return table, deep_compression_table(dm)


DC_EPOCHS, DC_KMEANS_FROM, DC_BITS = 7, 4, 5  # prune in epochs 0-2, fine-tune sparse in 3, share from epoch 4


def deep_compression_table(dm: pl.LightningDataModule, fp32_epochs: int = DC_EPOCHS) -> Table:
    """Prune -> k-means -> Huffman on LeNet-300-100, against the dense model fine-tuned as long."""
    dense, _, _ = fashion_dense()
    dense_acc = finetune(dense, dm, fp32_epochs, [])[0]
    model, _, _ = fashion_dense()
    rate = 1 - 0.08 ** (1 / 3)
    callbacks = [
        IterativePruning(sparsity=0.92, schedule="iterative", rate=rate),
        QATFakeQuant(scheme="kmeans", bits=DC_BITS, start_epoch=min(DC_KMEANS_FROM, fp32_epochs - 1)),
    ]
    acc = finetune(model, dm, fp32_epochs, callbacks)[0]
    sizes = stage_sizes(model)
    table = Table(
        f"Deep Compression, LeNet-300-100 on Fashion-MNIST (92% pruned in 3 rounds, {DC_BITS}-bit k-means from "
        f"epoch {DC_KMEANS_FROM + 1}, {fp32_epochs} fine-tune epochs)",
        ["stage", "bytes", "vs FP32", "test acc"],
    )
    table.rows.append(["dense FP32 (fine-tuned as long)", f"{sizes['dense']:,.0f}", "1.0×", f"{dense_acc:.2%}"])
    labels = {
        "pruned": "pruned + relative indices",
        "kmeans": f"+ {DC_BITS}-bit k-means sharing",
        "huffman": "+ Huffman",
    }
    for stage, label in labels.items():
        table.rows.append([label, f"{sizes[stage]:,.0f}", f"{sizes['dense'] / sizes[stage]:.1f}×", f"{acc:.2%}"])
    table.notes.append(
        f"Δ accuracy vs dense: {100 * (acc - dense_acc):+.2f} points. Target (issue #4): >= 35× smaller with "
        "<= 0.5 point loss (Han et al.: 40× on MNIST). Sizes count every parameter (biases FP32); code tables "
        "excluded, as in the paper."
    )
    return table


def run() -> list[Table]:
    """All three QAT tables."""
    quiet()
    return [step_time_table(), *accuracy_table()]
