"""Physical structured pruning: CPU forward time of a row-masked model against the same model with the rows removed.

Every Linear / conv but the last loses the given fraction of its rows / filters (``functional.masks.row_mask``, bias
entries masked with them); ``prune_structured`` then removes them and the matching inputs downstream. Both models
run in one process, timed interleaved under ``torch.inference_mode()``, medians reported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks import Table, interleaved_medians
from lightning_compress.examples.models import SmallCNN
from lightning_compress.export.structured import prune_structured
from lightning_compress.functional.masks import row_mask

BATCH = 256


def _mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _masked(model: nn.Module, sparsity: float) -> nn.Module:
    """``model`` with the smallest-L1 rows of every Linear / conv but the last zeroed, bias entries included."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in layers[:-1]:
            mask = row_mask(layer.weight, sparsity)
            layer.weight.mul_(mask)
            layer.bias.mul_(mask.reshape(mask.shape[0], -1)[:, 0])
    return model.eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _measure(build: Callable[[], nn.Module], shape: tuple[int, ...], sparsity: float) -> list[str]:
    """Params masked / pruned, ms masked / pruned, speed-up and the largest output difference, as table cells."""
    torch.manual_seed(0)
    masked = _masked(build(), sparsity)
    x = torch.randn(shape)
    pruned = prune_structured(masked, x[:2])
    with torch.inference_mode():
        diff = (masked(x) - pruned(x)).abs().max().item()
        ms = interleaved_medians({"m": lambda: masked(x), "p": lambda: pruned(x)}, repeats=15, warmup=3)
    cells = [f"{_params(masked):,}", f"{_params(pruned):,}", f"{ms['m'] * 1e3:.3f}", f"{ms['p'] * 1e3:.3f}"]
    return cells + [f"{ms['m'] / ms['p']:.2f}×", f"{diff:.1e}"]


def run() -> list[Table]:
    """One table: each model at 50% and 75% rows pruned, masked vs physically pruned forward time."""
    cases = {
        "MLP 784-300-100-10": (lambda: _mlp(784, 300, 100, 10), (BATCH, 784)),
        "MLP 1024-4096-4096-10": (lambda: _mlp(1024, 4096, 4096, 10), (BATCH, 1024)),
        "SmallCNN (1×8×8, width 16)": (SmallCNN, (BATCH, 1, 8, 8)),
    }
    table = Table(
        f"Physical structured pruning: CPU forward at batch {BATCH}, masked vs rows removed",
        ["model", "rows pruned", "params masked", "params pruned", "ms masked", "ms pruned", "speed-up", "max |Δ|"],
    )
    for name, (build, shape) in cases.items():
        for sparsity in (0.5, 0.75):
            table.rows.append([name, f"{sparsity:.0%}", *_measure(build, shape, sparsity)])
    table.notes.append(
        "Every Linear / conv except the last is pruned (the output size stays). The masked model is the dense model "
        "with zero rows, so it costs what the unpruned model costs; max |Δ| is the largest output difference."
    )
    table.notes.append(f"{torch.get_num_threads()} torch threads, FP32, `torch.inference_mode()`, medians of 15.")
    return [table]
