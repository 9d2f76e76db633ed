"""Tell it the budget, not the recipe: per-layer compression options searched to a byte or loss budget.

:func:`option_scan` estimates, for every selected layer and every candidate option (``int8``, ``int4_g128``,
``int4``, ``int3``, ``2:4``, ``2:4_int8``, ``keep`` ...), how much the model's loss rises when that layer alone is
compressed so, from one calibration pass with gradients and no per-option model evaluation:

    Δloss_i,k ≈ ½ Σ_o F_o · (ΔW H ΔWᵀ)_oo / N,        ΔW = W − Ŵ_k

with ``H = Σ_t x_t x_tᵀ`` the layer's input second moment, ``F_o`` the mean squared gradient of the summed loss
with respect to output ``o`` (the diagonal output factor of K-FAC's Fisher, Martens & Grosse 2015), ``N`` the
number of loss targets and ``Ŵ_k`` what the applying solver makes of the weight: GPTQ for quantized options,
SparseGPT (then GPTQ, keeping the zeros) for N:M ones. ``(ΔW H ΔWᵀ)_oo`` is the error those solvers are expected
to leave, in closed form (:mod:`~lightning_compress.functional.layer_error`), or, with ``estimate="solve"``, the
error of actually solving. This is the Fisher-weighted layer-output error of HAWQ-V3 / ModelOpt's AutoQuantize.
Bytes come from :func:`~lightning_compress.functional.size.tensor_bits`.

:meth:`OptionScan.plan` then picks one option per layer (layers reading the same input, such as q/k/v, share one)
at the least predicted loss within a byte budget, or at the least size within a loss budget, by the exact
multiple-choice knapsack of :mod:`~lightning_compress.functional.knapsack`, and reports a Lagrangian lower bound.
The plan file it writes feeds ``GPTQFinalize(plan=PATH)``, ``SparseGPTPrune(plan=PATH)`` and ``AutoCompress``.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from lightning_compress.calibration.batches import (
    call_model,
    first_tensor,
    real_tokens,
    rows,
    split_batch,
    token_mask,
)
from lightning_compress.calibration.capture import eval_mode
from lightning_compress.calibration.gptq import is_gptq_layer, layer_inputs, solved_without_input, weight_matrix
from lightning_compress.calibration.threads import gptq_threads
from lightning_compress.evaluation import IGNORE_INDEX, is_causal_lm, next_token_loss
from lightning_compress.functional.gptq import GPTQOptions, gptq_quantize
from lightning_compress.functional.knapsack import integer_costs, lagrangian_bound, min_cost_choice, min_loss_choice
from lightning_compress.functional.layer_error import expected_error
from lightning_compress.functional.size import TensorFormat, tensor_bits
from lightning_compress.functional.sparsegpt import sparsegpt_prune
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.select import select_layers

log = logging.getLogger(__name__)

DEFAULT_OPTIONS: tuple[str, ...] = ("keep", "int8", "int4_g128", "int4", "int3", "2:4", "2:4_int8")
ESTIMATES = ("closed_form", "solve")
FISHERS = ("true", "empirical")
DEFAULT_GPTQ = GPTQOptions(act_order=True, static_groups=True, clip_search=True)
"""What the plan is applied with by default (``GPTQFinalize``'s defaults), so what the scan predicts for."""
PLAN_HEADER = "# per-layer compression plan (written by lightning_compress.budget)\n"
_OPTION_RE = re.compile(r"^(?:(\d+):(\d+))?_?(?:int(\d+)(?:_g(\d+))?)?$")
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}  # fmt: skip
LossFn = Callable[[nn.Module, Any], tuple[Tensor, int]]
"""``loss_fn(model, batch) -> (summed loss, number of targets)``: the loss whose increase the scan predicts."""


@dataclass(frozen=True)
class Option:
    """One way to store a layer's weight, by name: ``keep``, ``int{b}`` (per output channel), ``int{b}_g{G}`` (one
    scale per ``G`` inputs), ``N:M`` (N of every M inputs kept, values as stored) or ``N:M_int{b}[_g{G}]``.

    Integer grids are asymmetric at 2-4 bits and symmetric at 5-8 (what :class:`~lightning_compress.GPTQFinalize`
    chooses), with a float32 scale (+ int8 zero-point) per block, as the size accounting counts them.
    """

    name: str
    bits: int | None = None
    group_size: int | None = None
    nm: tuple[int, int] | None = None

    @property
    def symmetric(self) -> bool:
        """Whether the grid has no zero-point (5-8 bits)."""
        return self.bits is not None and self.bits > 4

    def refusal(self, layer: nn.Module) -> str | None:
        """Why this option cannot store ``layer``'s weight (a group or M that does not divide its input width, N:M
        on a conv), or None."""
        width = weight_matrix(layer).shape[1]
        if self.nm is not None and not isinstance(layer, nn.Linear):
            return "N:M needs a Linear"
        if self.nm is not None and width % self.nm[1]:
            return f"M={self.nm[1]} does not divide the input width {width}"
        if self.group_size is not None and width % self.group_size:
            return f"group_size={self.group_size} does not divide the input width {width}"
        return None

    def weight_bits(self, shape: Sequence[int], stored_bits: int) -> int:
        """Storage bits of a weight of ``shape`` (``(out, in...)``) under this option, metadata included; ``keep``
        and the values of a float N:M option take ``stored_bits`` each."""
        out, numel = shape[0], math.prod(shape)
        blocks = 0 if self.bits is None else out * (1 if self.group_size is None else numel // out // self.group_size)
        fmt = TensorFormat(bits=self.bits or stored_bits, n_scales=blocks, asymmetric=self.bits is not None
                           and not self.symmetric, nm=self.nm)  # fmt: skip
        return tensor_bits(numel, numel if self.nm is None else numel * self.nm[0] // self.nm[1], fmt)

    def gptq_options(self, base: GPTQOptions | None = None) -> GPTQOptions:
        """The GPTQ solve of this option's grid: ``base`` (act order, clipping search, dampening ...) with its bits,
        group size and symmetry; static groups, so each group keeps one scale."""
        if self.bits is None:
            raise ValueError(f"option {self.name!r} quantizes nothing")
        return replace(base or DEFAULT_GPTQ, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                       static_groups=True)  # fmt: skip


def parse_option(name: str) -> Option:
    """The :class:`Option` a name spells (``"int4_g128"``, ``"2:4_int8"``, ``"keep"``).

    Raises:
        ValueError: a name outside the grammar, bits outside 2..8, a group size < 1, or N >= M.
    """
    match = _OPTION_RE.match(str(name)) if isinstance(name, str) else None
    allowed = "'keep', 'int<2..8>', 'int<b>_g<G>', 'N:M', 'N:M_int<b>[_g<G>]'"
    if name == "keep":
        return Option("keep")
    if not match or not any(match.groups()) or (match.group(4) and not match.group(3)):
        raise ValueError(f"option {name!r} is not a compression option; allowed: {allowed}")
    n, m, bits, group = (int(g) if g else None for g in match.groups())
    if bits is not None and not 2 <= bits <= 8:
        raise ValueError(f"option {name!r}: bits must be 2..8, got {bits}")
    if group is not None and group < 1:
        raise ValueError(f"option {name!r}: the group size must be positive, got {group}")
    if n is not None and not 0 < n < m:
        raise ValueError(f"option {name!r}: N:M needs 0 < N < M, got {n}:{m}")
    return Option(name, bits, group, None if n is None else (n, m))


def parse_bytes(budget: str | int | float) -> int:
    """Bytes from a size: ``8e9``, ``"8GB"`` (10⁹), ``"7.5GiB"`` (2³⁰), ``"500MB"``, ``"1200000"``.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a size such as 8e9 or '8GB', got {budget!r}")
    text = str(budget).strip().replace("_", "")
    match = re.fullmatch(r"([0-9.eE+-]+)\s*([a-zA-Z]*)", text)
    try:
        value = Decimal(match.group(1)) * _BYTE_UNITS[match.group(2).lower()] if match else None
    except (InvalidOperation, KeyError):
        value = None
    if value is None or not value.is_finite() or value <= 0:
        raise ValueError(f"budget must be a positive size (bytes, or with a unit {sorted(_BYTE_UNITS)[1:]}), "
                         f"got {budget!r}")  # fmt: skip
    return int(value)


def supervised(model: nn.Module, batch: Any, output: Any = None) -> bool:
    """Whether :func:`calibration_loss` has real targets for ``batch``: a causal LM, or class labels with ``(B, C)``
    logits (``output``: the model's output on the batch, computed when None)."""
    if is_causal_lm(model):
        return True
    inputs, labels = split_batch(batch)
    if not isinstance(labels, Tensor) or labels.is_floating_point():
        return False
    y = first_tensor(call_model(model, inputs) if output is None else output)
    return y.dim() == 2 and labels.shape == y.shape[:1]


def parse_budget(budget: str | int | float) -> tuple[int | None, float | None]:
    """``(bytes, None)`` from a size (:func:`parse_bytes`), or ``(None, ratio)`` from ``"4x"`` (4 times smaller).

    Raises:
        ValueError: neither, or a ratio below 1.
    """
    text = str(budget).strip().lower()
    if isinstance(budget, str) and text.endswith("x"):
        try:
            ratio = float(text[:-1])
        except ValueError:
            ratio = math.nan
        if not ratio >= 1 or math.isinf(ratio):
            raise ValueError(f"budget={budget!r}: a ratio budget is a number >= 1 followed by x, such as '4x'")
        return None, ratio
    return parse_bytes(budget), None


def sampled_targets(logits: Tensor, seed: int) -> Tensor:
    """One class drawn from each row's ``softmax(logits)`` (``(..., C)`` -> ``(...)``), seeded, so the Fisher it
    gives is the model's own (the true Fisher, the Gauss-Newton matrix of cross-entropy) rather than the data's."""
    probs = logits.detach().float().flatten(0, -2).softmax(dim=-1)
    drawn = torch.multinomial(probs.cpu(), 1, generator=torch.Generator().manual_seed(seed)).to(logits.device)
    return drawn.reshape(logits.shape[:-1])


def calibration_loss(model: nn.Module, batch: Any, fisher: str = "true") -> tuple[Tensor, int]:
    """The loss the scan's gradients come from, summed, and its number of targets, for one batch.

    A causal LM: the next-token cross-entropy over the real tokens; a batch with class labels and ``(B, C)``
    logits: their cross-entropy. With ``fisher="true"`` (the scan's default) the targets are drawn from the model's
    own predictions (:func:`sampled_targets`), whose squared gradients estimate the cross-entropy's Gauss-Newton
    matrix (Kunstner et al. 2019: the empirical Fisher of the data's labels does not); ``"empirical"`` takes the
    data's (what :func:`mean_loss` measures). Anything else (an encoder's embeddings): ``Σ rᵀ y`` with a fixed
    Gaussian probe ``r`` per output row, whose squared gradients estimate the Gauss-Newton matrix ``JᵀJ`` of ½‖Δy‖²
    per row (Hutchinson), so the prediction is the mean ½‖Δy‖² of the model's output rows.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher={fisher!r} is not supported; allowed: {FISHERS}")
    inputs, labels = split_batch(batch)
    out = call_model(model, inputs)
    if is_causal_lm(model):
        logits = getattr(out, "logits", None)
        logits = first_tensor(out) if logits is None else logits
        ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        ids = ids.to(logits.device)
        if fisher == "true":  # next tokens drawn from the model, at every position the data has a next token
            ids = torch.cat([ids[:, :1], sampled_targets(logits[:, :-1], ids.numel())], dim=1)
        loss, _, targets = next_token_loss(logits, ids, token_mask(inputs))
        count = int((targets != IGNORE_INDEX).sum())
        return loss * count, count
    y = first_tensor(out)
    if supervised(model, batch, out):
        targets = sampled_targets(y, y.numel()) if fisher == "true" else labels.to(y.device)
        return F.cross_entropy(y.float(), targets, reduction="sum"), int(labels.numel())
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(y.numel()), dtype=torch.float32)
    return (y.float() * probe.to(y.device)).sum(), int(y.numel() // y.shape[-1])


@dataclass
class _Stats:
    hessian: Tensor  # Σ x xᵀ over the layer's real tokens (in, in), float32; one object for layers sharing an input
    fisher: Tensor  # Σ g² over the same tokens (out,), float64
    tokens: int = 0


def _statistics(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[Any], loss_fn: LossFn, micro_batch: int
) -> tuple[dict[str, _Stats], int, float, list[list[str]]]:
    """One pass with gradients: each layer's ``H``, ``Σ g²`` and token count, the number of loss targets, the mean
    loss, and the groups of layers that read the very same input tensor (q/k/v, gate/up: one ``H`` between them,
    accumulated once)."""
    stats = {n: _Stats(torch.zeros(weight_matrix(m).shape[1], weight_matrix(m).shape[1], device=m.weight.device),
                       torch.zeros(m.weight.shape[0], dtype=torch.float64, device=m.weight.device))
             for n, m in layers.items()}  # fmt: skip
    outputs: list[tuple[str, Tensor]] = []
    owner: dict[str, str] = {}  # layer -> the layer whose input it shares (itself when first)
    first_readers: dict[int, str] = {}
    held: list[Tensor] = []
    state: dict[str, Any] = {"mask": None}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            x = args[0]
            if name not in owner:  # the first micro-batch: who reads which tensor (held, so ids stay unique)
                owner[name] = first_readers.setdefault(id(x), name)
                held.append(x)
            if owner[name] == name:
                cols = layer_inputs(module, real_tokens(x, state["mask"]).detach()).float()
                stats[name].hessian.addmm_(cols.T, cols)
                stats[name].tokens += cols.shape[0]
            outputs.append((name, out))

        return record

    targets, total = 0, 0.0
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    grads_were = {n: m.weight.requires_grad for n, m in layers.items()}
    try:
        for m in layers.values():
            m.weight.requires_grad_(True)  # so every layer output is on the graph; no .grad is written
        with eval_mode(model), torch.enable_grad():
            for batch in tqdm(batches, desc="option scan", unit="batch", disable=None):
                size = _batch_rows(batch)
                for start in range(0, size, micro_batch):
                    part = rows(batch, start, min(start + micro_batch, size))
                    state["mask"] = token_mask(split_batch(part)[0])
                    loss, count = loss_fn(model, part)
                    targets, total = targets + count, total + float(loss.detach())
                    grads = torch.autograd.grad(loss, [o for _, o in outputs], allow_unused=True)
                    for (name, out), g in zip(outputs, grads, strict=True):
                        if g is not None:
                            g = g.movedim(1, -1) if out.dim() == 4 else real_tokens(g, state["mask"])  # conv: C last
                            stats[name].fisher += g.detach().to(torch.float64).pow(2).reshape(-1, g.shape[-1]).sum(0)
                    outputs.clear()
                    held.clear()
                    first_readers.clear()
    finally:
        for h in handles:
            h.remove()
        for n, m in layers.items():
            m.weight.requires_grad_(grads_were[n])
    if targets == 0:
        raise ValueError("the calibration batches hold no loss target")
    for name, first in owner.items():
        stats[name].hessian, stats[name].tokens = stats[first].hessian, stats[first].tokens
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(owner.get(name, name), []).append(name)
    return stats, targets, total / targets, list(groups.values())


def _batch_rows(batch: Any) -> int:
    inputs, _ = split_batch(batch)
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    first = first[0] if isinstance(first, (tuple, list)) else first
    return int(first.shape[0])


def compressed_weight(option: Option, weight: Tensor, hessian: Tensor, base: GPTQOptions | None = None) -> Tensor:
    """What the applying solvers make of ``weight`` ``(out, in)`` under ``option`` with input Hessian ``hessian``
    ``(in, in)``: GPTQ for a grid, SparseGPT (then GPTQ on the kept weights) for N:M, ``weight`` for ``keep``."""
    out = weight.float()
    if option.nm is not None:
        out = sparsegpt_prune(out, hessian, nm=option.nm, threads=gptq_threads).weight
    if option.bits is not None:
        keep = None if option.nm is None else out != 0
        out = gptq_quantize(out, hessian, option.gptq_options(base), threads=gptq_threads, keep=keep).weight
    return out


@dataclass(frozen=True)
class CompressionPlan:
    """One option per layer, with what the solver predicted.

    Attributes:
        layers: ``{layer name: option name}`` in model order.
        predicted_loss: the scan's predicted loss increase of the plan (sum over layers).
        total_bytes: the model's weights under the plan (every parameter, selected layers as planned).
        budget_bytes: the byte budget solved for, or None (a loss budget).
        lower_bound: a Lagrangian lower bound on the least predicted loss within the plan's bytes, or None.
        layer_bytes: ``{layer name: bytes of its weight under the plan}``.
    """

    layers: dict[str, str]
    predicted_loss: float = 0.0
    total_bytes: float = 0.0
    budget_bytes: float | None = None
    lower_bound: float | None = None
    layer_bytes: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping) or not self.layers:
            raise ValueError(f"a plan needs a non-empty {{layer: option}} mapping, got {self.layers!r}")
        for name, option in self.layers.items():
            parse_option(option)
            if not isinstance(name, str):
                raise ValueError(f"plan layer names must be strings, got {name!r}")

    def option(self, layer: str) -> Option:
        """The :class:`Option` of ``layer``."""
        return parse_option(self.layers[layer])

    def quantized(self) -> dict[str, Option]:
        """The layers whose option has bits (what ``GPTQFinalize(plan=...)`` quantizes)."""
        return {n: o for n in self.layers if (o := self.option(n)).bits is not None}

    def sparse(self) -> dict[str, Option]:
        """The layers whose option has an N:M pattern (what ``SparseGPTPrune(plan=...)`` prunes)."""
        return {n: o for n in self.layers if (o := self.option(n)).nm is not None}

    def save(self, path: str | Path) -> Path:
        """Write the plan as YAML (a header, the numbers, then ``layers: {name: option}``); returns the path."""
        body = {"predicted_loss": float(self.predicted_loss), "total_bytes": float(self.total_bytes),
                "budget_bytes": self.budget_bytes, "lower_bound": self.lower_bound, "layers": dict(self.layers),
                "layer_bytes": {n: float(b) for n, b in self.layer_bytes.items()}}  # fmt: skip
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(PLAN_HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        """Read a plan written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file. ValueError: not a plan (no ``layers`` mapping, an unknown option).
        """
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise ValueError(f"{path}: not a compression plan (expected a 'layers: {{name: option}}' mapping)")
        keys = ("predicted_loss", "total_bytes", "budget_bytes", "lower_bound", "layer_bytes")
        return cls(layers={str(k): str(v) for k, v in data["layers"].items()},
                   **{k: data[k] for k in keys if data.get(k) is not None})  # fmt: skip

    def counts(self) -> dict[str, int]:
        """``{option: number of layers}`` in option order of first use."""
        out: dict[str, int] = {}
        for option in self.layers.values():
            out[option] = out.get(option, 0) + 1
        return out

    def to_markdown(self, measured: float | None = None) -> str:
        """The plan as markdown: bytes against the budget, predicted (and ``measured``) loss increase, the layers per
        option, then one row per layer (option, bytes)."""
        budget = f" of a {_size(self.budget_bytes)} budget" if self.budget_bytes else ""
        bound = f" (lower bound {self.lower_bound:.4g})" if self.lower_bound is not None else ""
        seen = f"; measured {measured:.4g} on the calibration batches" if measured is not None else ""
        lines = [f"{len(self.layers)} layers; the model's weights take {_size(self.total_bytes)}{budget}. Predicted "
                 f"loss increase {self.predicted_loss:.4g}{bound}{seen}.", "",
                 "| option | layers | MB |", "|---|---:|---:|"]  # fmt: skip
        for option, count in self.counts().items():
            size = sum(self.layer_bytes.get(n, 0.0) for n, o in self.layers.items() if o == option)
            lines.append(f"| {option} | {count} | {size / 1e6:.4f} |")
        lines += ["", "| layer | option | MB |", "|---|---|---:|"]
        lines += [f"| {n} | {o} | {self.layer_bytes.get(n, math.nan) / 1e6:.4f} |" for n, o in self.layers.items()]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart: one bar per layer (its megabytes under the plan), coloured by its option."""
        from lightning_compress.plots import plan_bars

        return plan_bars(self, path)


@dataclass(frozen=True)
class OptionScan:
    """Predicted loss increase and storage of every (layer, option), from :func:`option_scan`.

    Attributes:
        options: the option names, in the order of each row.
        losses: ``{layer: (Δloss per option)}``, ``inf`` where an option cannot store the layer.
        bits: ``{layer: (storage bits per option)}``.
        groups: layers that must share one option (they read the same input: q/k/v, gate/up), each a list.
        fixed_bits: storage bits of every other parameter of the model (embeddings, norms, biases), counted once.
        base_loss: the mean calibration loss of the model as scanned (of the targets its Fisher was taken on).
        seconds: how long the scan took.
        weights: ``{layer: weight count}``.
    """

    options: tuple[str, ...]
    losses: dict[str, tuple[float, ...]]
    bits: dict[str, tuple[int, ...]]
    groups: list[list[str]]
    fixed_bits: int
    base_loss: float = math.nan
    seconds: float = 0.0
    weights: dict[str, int] = field(default_factory=dict)

    def layer_bytes(self, plan: Mapping[str, str]) -> dict[str, float]:
        """``{layer: bytes of its weight}`` under ``plan``."""
        return {n: self.bits[n][self.options.index(o)] / 8 for n, o in plan.items()}

    def total_bytes(self, plan: Mapping[str, str]) -> float:
        """Bytes of the whole model's weights under ``plan``."""
        return (self.fixed_bits + sum(self.bits[n][self.options.index(o)] for n, o in plan.items())) / 8

    def bits_per_weight(self, plan: Mapping[str, str]) -> float:
        """Average storage bits per weight of the planned layers under ``plan`` (scales, zero-points and N:M
        positions included)."""
        return sum(self.bits[n][self.options.index(o)] for n, o in plan.items()) / sum(self.weights[n] for n in plan)

    def predicted_loss(self, plan: Mapping[str, str]) -> float:
        """Sum over layers of the predicted loss increase of each layer's option (assumed additive)."""
        return sum(self.losses[n][self.options.index(o)] for n, o in plan.items())

    def uniform(self, option: str) -> dict[str, str]:
        """Every layer at ``option`` (the uniform configuration a plan is compared with)."""
        return dict.fromkeys(self.losses, option)

    def _items(self) -> tuple[Tensor, Tensor]:
        """Per group: summed losses (inf where any member refuses the option) and summed bits, ``(G, K)``."""
        losses = torch.tensor([[sum(self.losses[n][k] for n in g) for k in range(len(self.options))]
                               for g in self.groups], dtype=torch.float64)  # fmt: skip
        bits = torch.tensor([[sum(self.bits[n][k] for n in g) for k in range(len(self.options))]
                             for g in self.groups], dtype=torch.long)  # fmt: skip
        return torch.nan_to_num(losses, nan=math.inf, posinf=math.inf), bits

    def plan(
        self,
        budget_bytes: str | int | float | None = None,
        ratio: float | None = None,
        max_loss_increase: float | None = None,
        max_bins: int = 100_000,
    ) -> CompressionPlan:
        """One option per layer (the same within each group).

        With ``budget_bytes`` (or ``ratio``: the model's current bytes / ratio) it minimises the predicted loss
        subject to the whole model's bytes ``<= budget``; with ``max_loss_increase`` it minimises the bytes subject
        to the predicted loss ``<=`` it. Exact on integer bits while the table fits ``max_bins`` units; beyond that
        bits are rounded up to a coarser unit (the budget still holds) and ``lower_bound`` bounds the gap.

        Raises:
            ValueError: not exactly one budget, or one no plan meets (naming the least reachable).
        """
        given = [k for k, v in {"budget_bytes": budget_bytes, "ratio": ratio,
                                "max_loss_increase": max_loss_increase}.items() if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(f"give exactly one of budget_bytes, ratio, max_loss_increase; got {given or 'none'}")
        losses, bits = self._items()
        if max_loss_increase is not None:
            if not isinstance(max_loss_increase, (int, float)) or not max_loss_increase >= 0:
                raise ValueError(f"max_loss_increase must be a number >= 0, got {max_loss_increase!r}")
            binned = integer_costs(losses, bits, int(bits.max(dim=1).values.sum()), max_bins)
            picks = min_cost_choice(losses, binned.costs, float(max_loss_increase))
            if picks is None:
                raise ValueError(f"max_loss_increase={max_loss_increase} cannot be met: the least predicted loss "
                                 f"is {float(losses.min(dim=1).values.sum()):.4g}")  # fmt: skip
            budget = None
        else:
            budget = self._budget_bits(budget_bytes, ratio)
            binned = integer_costs(losses, bits, budget - self.fixed_bits, max_bins)
            picks = min_loss_choice(losses, binned.costs, binned.capacity)
            if picks is None:
                least = self.fixed_bits + int(torch.where(torch.isfinite(losses), bits, 1 << 62).min(1).values.sum())
                raise ValueError(f"budget of {budget / 8:,.0f} bytes cannot be met: the smallest plan takes "
                                 f"{least / 8:,.0f} bytes (model parts outside the plan: {self.fixed_bits / 8:,.0f})"
                                 )  # fmt: skip
        plan = {n: self.options[k] for g, k in zip(self.groups, picks, strict=True) for n in g}
        plan = {n: plan[n] for n in self.losses}  # model order
        used = sum(int(bits[i, k]) for i, k in enumerate(picks))
        bound = lagrangian_bound(losses, bits, budget - self.fixed_bits if budget is not None else used)
        result = CompressionPlan(plan, self.predicted_loss(plan), self.total_bytes(plan),
                                 None if budget is None else budget / 8, bound, self.layer_bytes(plan))  # fmt: skip
        log.info("plan: %.0f bytes, predicted loss %.4g (bound %.4g), %s", result.total_bytes, result.predicted_loss,
                 bound, result.counts())  # fmt: skip
        return result

    def _budget_bits(self, budget_bytes: str | int | float | None, ratio: float | None) -> int:
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
                raise ValueError(f"ratio must be a number >= 1 (current bytes / target bytes), got {ratio!r}")
            keep = self.options.index("keep") if "keep" in self.options else None
            if keep is None:
                raise ValueError("ratio needs 'keep' among the options (the current size it divides)")
            return math.floor((self.fixed_bits + sum(b[keep] for b in self.bits.values())) / ratio)
        return parse_bytes(budget_bytes) * 8


def _size(num_bytes: float) -> str:
    """``1,234 bytes``, ``12.35 MB`` or ``1.23 GB``."""
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:,.3f} GB"
    return f"{num_bytes / 1e6:,.3f} MB" if num_bytes >= 1e6 else f"{num_bytes:,.0f} bytes"


def stored_bits(t: Tensor) -> int:
    """Bits per element of a tensor as it is stored (32 for float32, 16 for bfloat16 ...)."""
    return t.element_size() * 8


def _fixed_bits(model: nn.Module, layers: Mapping[str, nn.Module]) -> int:
    """Bits of every distinct parameter of ``model`` that is not a selected layer's weight (tied ones once)."""
    skip = {id(m.weight) for m in layers.values()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields a tied Parameter once
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * stored_bits(p)
    return total


def option_scan(
    model: nn.Module,
    batches: Iterable[Any],
    options: Sequence[str] = DEFAULT_OPTIONS,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    micro_batch: int = 4,
    tie_shared_inputs: bool = True,
    gptq: GPTQOptions | None = None,
    estimate: str = "closed_form",
    fisher: str = "true",
) -> OptionScan:
    """Predict every selected layer's loss increase under every option, from one calibration pass with gradients.

    Cost: one forward and backward over ``batches`` (in ``micro_batch`` rows), then per layer one Cholesky factor
    per column order and a few passes over the weight per option; the model is not evaluated per option and is left
    unchanged.

    Args:
        model: the model (a Hugging Face model, a LightningModule ...); only read.
        batches: training batches as the model's dataloader yields them (labels kept: the loss needs them).
        options: option names (:func:`parse_option`); at most one N:M pattern.
        targets, ignore: regexes over layer names (default every Linear and Conv2d).
        loss_fn: ``(model, batch) -> (summed loss, targets)``; default :func:`calibration_loss` with ``fisher``.
        micro_batch: rows per forward / backward.
        tie_shared_inputs: layers reading the same input tensor (q/k/v, gate/up) share one option (what fused
            serving kernels need).
        gptq: the GPTQ settings the plan will be applied with (default: act order, static groups, clipping search).
        estimate: each option's output error ``ΔW H ΔWᵀ``: ``"closed_form"`` (the error GPTQ / SparseGPT are
            expected to leave, :func:`~lightning_compress.functional.layer_error.expected_error`; within 0.65-1.12×
            the solved one on SmolLM2's layers) or ``"solve"`` (run the solvers on every option: exact for a layer
            alone, and slower).
        fisher: ``"true"`` (targets drawn from the model: SmolLM2 at 3.0 bits, perplexity 110.0 against 113.4 with
            the data's) or ``"empirical"`` (the data's labels), see :func:`calibration_loss`.

    Raises:
        ValueError: an unknown estimate, no options, a repeated or unknown option, two N:M patterns, a bad
            ``micro_batch``, no batch.
    """
    parsed = [parse_option(o) for o in options]
    if not parsed or len({o.name for o in parsed}) != len(parsed):
        raise ValueError(f"options must be distinct option names, got {list(options)}")
    if len({o.nm for o in parsed if o.nm is not None}) > 1:
        raise ValueError(f"options may hold one N:M pattern only, got {[o.name for o in parsed if o.nm]}")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive int, got {micro_batch!r}")
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate={estimate!r} is not supported; allowed: {ESTIMATES}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher={fisher!r} is not supported; allowed: {FISHERS}")
    gptq = gptq or DEFAULT_GPTQ
    layers = select_layers(model, targets, ignore, accept=lambda m: is_gptq_layer(m) and not is_fake_quant(m),
                           kind="Linear / Conv2d (groups=1)")  # fmt: skip
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; the option scan needs at least one calibration batch")
    started = time.perf_counter()
    loss_fn = loss_fn or functools.partial(calibration_loss, fisher=fisher)
    stats, n_targets, base_loss, groups = _statistics(model, layers, batches, loss_fn, micro_batch)
    losses, bits = {}, {}
    for name, layer in tqdm(layers.items(), desc="option errors", unit="layer", disable=None):
        s, weight = stats[name], weight_matrix(layer).float()
        hessian = solved_without_input(name, 2 * s.hessian, "option scan")
        fisher = s.fisher / max(s.tokens, 1)
        row = []
        for option in parsed:
            if option.refusal(layer) is not None:
                row.append(math.inf)
                continue
            if estimate == "solve":
                delta = (weight - compressed_weight(option, weight, hessian, gptq)).double()
                error = ((delta @ s.hessian.double()) * delta).sum(dim=1)  # (out,) Σ_t (ΔW x_t)²
            elif option.bits is None and option.nm is None:
                error = torch.zeros_like(fisher)
            else:
                error = expected_error(weight, hessian / 2, option.bits, option.group_size, option.symmetric,
                                       option.nm, gptq.act_order, gptq.clip_search, gptq.percdamp)  # fmt: skip
            row.append(float(0.5 * (fisher * error).sum()) / n_targets)
        losses[name] = tuple(row)
        bits[name] = tuple(o.weight_bits(layer.weight.shape, stored_bits(layer.weight)) for o in parsed)
    if not tie_shared_inputs:
        groups = [[n] for n in layers]
    weights = {n: m.weight.numel() for n, m in layers.items()}
    return OptionScan(tuple(o.name for o in parsed), losses, bits, groups, _fixed_bits(model, layers), base_loss,
                      time.perf_counter() - started, weights)  # fmt: skip


def plan_compression(
    model: nn.Module,
    batches: Iterable[Any],
    budget_bytes: str | int | float | None = None,
    ratio: float | None = None,
    max_loss_increase: float | None = None,
    options: Sequence[str] = DEFAULT_OPTIONS,
    **scan_kwargs: Any,
) -> CompressionPlan:
    """:func:`option_scan` then :meth:`OptionScan.plan`: the per-layer plan within one budget.

    Example::

        plan = plan_compression(llm, batches, budget_bytes="200MB")   # or ratio=4, or max_loss_increase=0.05
        plan.save("plan.yaml")  # GPTQFinalize(plan="plan.yaml"), SparseGPTPrune(plan=...), AutoCompress(plan=...)
    """
    scan = option_scan(model, batches, options, **scan_kwargs)
    return scan.plan(budget_bytes=budget_bytes, ratio=ratio, max_loss_increase=max_loss_increase)


def as_plan(plan: str | Path | CompressionPlan) -> CompressionPlan:
    """A :class:`CompressionPlan` from itself or a YAML path.

    Raises:
        ValueError: a path that is not a file, or a file that is not a plan. TypeError: anything else.
    """
    if isinstance(plan, CompressionPlan):
        return plan
    if isinstance(plan, (str, Path)):
        if not Path(plan).is_file():
            raise ValueError(f"plan={str(plan)!r} is not a file; allowed: a plan YAML from CompressionPlan.save")
        return CompressionPlan.load(plan)
    raise TypeError(f"plan must be a CompressionPlan or a YAML path, got {type(plan).__name__}")


def exact_names(names: Iterable[str]) -> list[str]:
    """Regexes matching exactly these layer names (``targets`` for the callbacks a plan drives)."""
    return [re.escape(n) for n in names]


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn | None = None, micro_batch: int = 4) -> float:
    """The model's mean loss per target over ``batches`` (eval mode, no gradients): by default the data's
    cross-entropy (:func:`calibration_loss` with the data's labels)."""
    loss_fn = loss_fn or functools.partial(calibration_loss, fisher="empirical")
    total, targets = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            size = _batch_rows(batch)
            for start in range(0, size, micro_batch):
                loss, count = loss_fn(model, rows(batch, start, min(start + micro_batch, size)))
                total, targets = total + float(loss), targets + count
    if targets == 0:
        raise ValueError("the batches hold no loss target")
    return total / targets


@torch.no_grad()
def output_rows(model: nn.Module, batches: Iterable[Any], micro_batch: int = 4) -> list[Tensor]:
    """The model's main output (:func:`~lightning_compress.calibration.batches.first_tensor`) on every micro-batch,
    float32 on the CPU, in eval mode."""
    outs = []
    with eval_mode(model):
        for batch in batches:
            size = _batch_rows(batch)
            for start in range(0, size, micro_batch):
                part = split_batch(rows(batch, start, min(start + micro_batch, size)))[0]
                outs.append(first_tensor(call_model(model, part)).float().cpu())
    return outs


def output_change(before: Sequence[Tensor], after: Sequence[Tensor]) -> float:
    """Mean over output rows of ½‖y_after − y_before‖², what :func:`calibration_loss`'s probe predicts."""
    total = sum(float(0.5 * (a - b).pow(2).sum()) for a, b in zip(after, before, strict=True))
    return total / sum(b.numel() // b.shape[-1] for b in before)
