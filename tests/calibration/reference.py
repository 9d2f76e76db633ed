"""The true-sequential walk of Frantar et al.'s GPTQ / SparseGPT scripts, written the slow, obvious way: for each
block and each group of its Linears in execution order, Hessians from whole-model forwards (hooks, real tokens only)
with everything before already solved, then each layer of the group solved."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_compress.functional.gptq import hessian_update

# A Llama decoder block's Linears, grouped as the reference's llama.py groups them (true_sequential).
LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def true_sequential_reference(
    model: nn.Module,
    batches: list[dict],
    solve: Callable[[str, nn.Module, torch.Tensor], object],
    groups: list[list[str]] = LLAMA_GROUPS,
) -> dict[str, object]:
    """``{name: solve(name, layer, H)}`` for every Linear of ``model.model.layers``, block by block, group by group
    (``groups``: ``[all of them]`` for one pass per block, as Wanda's script does)."""
    results = {}
    for i in range(len(model.model.layers)):
        for group in groups:
            names = [f"model.layers.{i}.{suffix}" for suffix in group]
            layers = {n: model.get_submodule(n) for n in names}
            hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
            current = {}

            def hook(name, hessians=hessians, current=current):
                def add(module, args):  # returns None: the input stays as it is
                    hessian_update(hessians[name], args[0][current["mask"]])

                return add

            handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
            with torch.no_grad():
                for b in batches:
                    current["mask"] = b["attention_mask"].bool()
                    model(**b)
            for h in handles:
                h.remove()
            with torch.no_grad():
                for n, m in layers.items():
                    results[n] = solve(n, m, hessians[n])
    return results
