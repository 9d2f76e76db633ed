"""IterativePruning: magnitude, N:M and structured pruning on a schedule, exact across checkpoints, DDP and FSDP."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from torch import Tensor, nn

from lightning_compress.functional.checks import check_choice, check_patterns, check_positive_int
from lightning_compress.functional.masks import (
    check_sparsity,
    global_magnitude_masks,
    group_head_masks,
    magnitude_mask,
    nm_mask,
    parse_nm,
    row_mask,
)
from lightning_compress.functional.schedules import cubic_sparsity, geometric_rounds
from lightning_compress.nn.attention import AttentionLayout, attention_kind, attention_layout
from lightning_compress.nn.distributed import broadcast_, full_tensor, local_like
from lightning_compress.nn.select import select_layers

log = logging.getLogger(__name__)

METHODS = ("magnitude", "nm", "rows", "heads")
SCHEDULES = ("oneshot", "iterative", "cubic")
SCOPES = ("layer", "global")


@dataclass
class _Part:
    """One parameter of a pruning unit: ``view`` is the shape the mask is computed on, ``dim`` its head/row dim."""

    name: str
    param: nn.Parameter
    view: tuple[int, ...]
    dim: int


@dataclass
class _Unit:
    """What one pruning decision covers: a layer's weight (and bias for rows), or an attention block's heads."""

    name: str
    parts: list[_Part]
    head_size: int | None = None


def _part(name: str, param: nn.Parameter, dim: int = 0, view: tuple[int, ...] | None = None) -> _Part:
    return _Part(name, param, tuple(view or param.shape), dim)


def _attention_parts(layout: AttentionLayout, model: nn.Module) -> list[_Part]:
    """The parameters one head decision covers in attention ``layout`` of ``model``, each with its head dim.

    ``"mha"``: the packed ``in_proj_weight`` viewed ``(3, E, E)`` and its bias ``(3, E)`` (heads along dim 1), and
    the ``out_proj`` columns. ``"bert"`` / ``"llama"``: the rows of the query / key / value Linears and their biases,
    and the columns of the output projection (``<parent>.output.dense`` / ``o_proj``) when there is one.
    """
    if layout.kind == "mha":
        mha = model.get_submodule(layout.name)
        e = mha.embed_dim
        parts = [_part(f"{layout.name}.in_proj_weight", mha.in_proj_weight, 1, (3, e, e))]
        if mha.in_proj_bias is not None:
            parts.append(_part(f"{layout.name}.in_proj_bias", mha.in_proj_bias, 1, (3, e)))
        parts.append(_part(f"{layout.output}.weight", mha.out_proj.weight, 1))
        return parts
    parts = []
    for proj in layout.projections:
        linear = model.get_submodule(proj)
        parts.append(_part(f"{proj}.weight", linear.weight))
        if linear.bias is not None:
            parts.append(_part(f"{proj}.bias", linear.bias))
    if layout.output is not None:
        parts.append(_part(f"{layout.output}.weight", model.get_submodule(layout.output).weight, 1))
    return parts


def load_plan(plan: Mapping[str, float] | str | Path) -> dict[str, float]:
    """Per-layer target sparsities from a dict or a YAML file (``layers: {name: sparsity}``, as
    ``scripts/sensitivity.py`` writes it; a flat ``{name: sparsity}`` mapping also works)."""
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.is_file():
            raise ValueError(f"plan={str(plan)!r} is not a file; allowed: a YAML plan file or a dict")
        plan = yaml.safe_load(path.read_text()) or {}
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a dict of layer -> sparsity or a YAML path, got {type(plan).__name__}")
    layers = plan.get("layers", plan) if "layers" in plan else plan
    return {str(k): check_sparsity(v, f"plan[{k!r}]") for k, v in dict(layers).items()}


class IterativePruning(pl.Callback):
    """Prune any LightningModule's layers on a schedule; masks hold through training, checkpoints and DDP.

    Methods: ``"magnitude"`` (unstructured, one global ranking by default or per layer), ``"nm"``
    (``pattern="2:4"``, any N < M, along the input dimension), ``"rows"`` (output rows / conv filters by L1 norm,
    with their bias), ``"heads"`` (whole attention heads of ``nn.MultiheadAttention``, BERT-style or Llama-style
    self-attention without grouped key/value heads, found by :mod:`lightning_compress.nn.attention`; q/k/v rows and
    output columns together). Schedules: ``"oneshot"`` (at fit start), ``"iterative"`` (prune ``rate`` of what
    remains at the end of every ``every_n_epochs`` epochs until the target, fine-tuning in between), ``"cubic"``
    (Zhu & Gupta 2017, by optimizer step from ``begin_step`` to ``end_step``, every ``frequency`` steps).

    Pruned weights are exactly zero after every optimizer step: gradients are masked before the step, weights
    after it, and optimizer state (momentum, Adam moments) is zeroed where a mask prunes, so nothing grows back.
    Weight keys never change: a checkpoint loads into the plain model with ``strict=True``. Masks, schedule
    position and rewind weights are this callback's state, saved in the checkpoint and restored on resume.
    Under DDP, rank 0's masks are broadcast so every rank holds the same. Under FSDP2 (Lightning's
    ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``) masks are ranked on the whole, all-gathered
    weights, kept whole (identical on every rank, so the checkpoint holds them whole, sharded or full) and applied
    to each rank's shard of the weights, gradients and optimizer state.

    YAML (``conf/compress/prune_magnitude.yaml``)::

        # @package _global_
        callbacks:
          pruning:
            _target_: lightning_compress.IterativePruning
            sparsity: 0.9
            schedule: iterative
            rate: 0.5

    Python::

        trainer = L.Trainer(callbacks=[IterativePruning(sparsity=0.9, schedule="cubic")])
        trainer = L.Trainer(callbacks=[IterativePruning(method="nm", pattern="2:4")])  # skips widths % 4 != 0
        IterativePruning(init_from=SparseGPTPrune(pattern="2:4"))  # SparseGPT's 2:4 masks, held while fine-tuning

    Args:
        sparsity: target fraction pruned per unit (weights, rows or heads), in ``[0, 1)``; None for 0.5. N:M
            prunes exactly ``1 - N/M`` (leave it unset; another value is an error).
        method: ``"magnitude"``, ``"nm"``, ``"rows"`` or ``"heads"``.
        schedule: ``"oneshot"``, ``"iterative"`` or ``"cubic"`` (N:M is one-shot only).
        pattern: the N:M pattern, e.g. ``"2:4"``.
        scope: ``"global"`` (one magnitude ranking over all selected layers, as Han et al. 2015 and Lightning's
            ``ModelPruning``: small, sensitive layers such as a classifier head keep more weights) or ``"layer"``
            (each layer to its target). None: ``"global"`` for ``method="magnitude"`` without a ``plan``, else
            ``"layer"``. Global won on real data (``python -m benchmarks pruning``: LeNet-300-100 at 90% on MNIST
            digits and Fashion-MNIST).
        targets, ignore: regexes over layer names (attention module names for ``"heads"``). N:M with
            ``targets=None`` skips (and logs) every layer whose input width is not divisible by M; a layer
            named by ``targets`` that does not divide is an error.
        plan: per-layer targets, ``{layer: sparsity}`` or a YAML file from ``scripts/sensitivity.py``; layers
            not in the plan use ``sparsity``.
        rate: iterative: fraction of the remaining weights pruned per round, in ``(0, 1)``.
        every_n_epochs: iterative: epochs between rounds.
        begin_step, end_step, frequency: cubic: the ramp in optimizer steps; ``end_step=None`` ends at 3/4 of
            the run's total steps.
        initial_sparsity: cubic: ``s_i``.
        rewind: lottery ticket (Frankle & Carbin 2019), iterative only: after each round reset surviving weights
            to their values at the start of fit (``"init"``) or after optimizer step ``k`` (an int), and
            clear their optimizer state.
        log_sparsity: log per-unit and global sparsity at every epoch end.
        init_from: a one-shot pruner (:class:`~lightning_compress.callbacks.sparsegpt.SparseGPTPrune` without
            ``bits``, :class:`~lightning_compress.callbacks.wanda.WandaPrune`) run at fit start on its
            ``num_batches`` training batches; its masks (and SparseGPT's updated weights) are the start, held
            through training (``schedule="oneshot"``; its ``targets`` / ``ignore`` choose the layers, so leave
            these None). A resumed run keeps the checkpoint's masks.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        method: str = "magnitude",
        schedule: str = "oneshot",
        pattern: str = "2:4",
        scope: str | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        plan: Mapping[str, float] | str | None = None,
        rate: float = 0.5,
        every_n_epochs: int = 1,
        begin_step: int = 0,
        end_step: int | None = None,
        frequency: int = 10,
        initial_sparsity: float = 0.0,
        rewind: str | int | None = None,
        log_sparsity: bool = True,
        init_from: Any = None,
    ) -> None:
        check_pruning_start(init_from, schedule, targets, ignore, plan)
        self.init_from = init_from
        self.method = check_choice("method", method, METHODS)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        if scope is None:
            scope = "global" if method == "magnitude" and plan is None else "layer"
        self.scope = check_choice("scope", scope, SCOPES)
        self.nm = parse_nm(pattern) if method == "nm" else None
        fixed = None if self.nm is None else 1 - self.nm[0] / self.nm[1]
        if fixed is not None and sparsity is not None and sparsity != fixed:
            raise ValueError(
                f"sparsity={sparsity!r} with method='nm', pattern={pattern!r}: N:M prunes exactly {fixed:g}; allowed: "
                f"sparsity unset (None) or {fixed:g}"
            )
        self.sparsity = check_sparsity(fixed if fixed is not None else 0.5 if sparsity is None else sparsity)
        check_patterns("targets", targets), check_patterns("ignore", ignore)
        if method == "nm" and schedule != "oneshot":
            raise ValueError(f"schedule={schedule!r} with method='nm': N:M sparsity is fixed, allowed: 'oneshot'")
        if scope == "global" and (method != "magnitude" or plan is not None):
            raise ValueError("scope='global' needs method='magnitude' and no per-layer plan")
        self.plan = load_plan(plan) if plan is not None else {}
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        check_positive_int("every_n_epochs", every_n_epochs), check_positive_int("frequency", frequency)
        if begin_step < 0 or (end_step is not None and end_step <= begin_step):
            raise ValueError(f"need 0 <= begin_step < end_step, got begin_step={begin_step}, end_step={end_step}")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if rewind is not None and not (rewind == "init" or (isinstance(rewind, int) and rewind >= 0)):
            raise ValueError(f"rewind must be None, 'init' or a step >= 0, got {rewind!r}")
        if rewind is not None and schedule != "iterative":
            raise ValueError(f"rewind={rewind!r} needs schedule='iterative' (rounds to rewind after)")
        self.targets, self.ignore = targets, ignore
        self.rate, self.every_n_epochs = float(rate), every_n_epochs
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.rewind = 0 if rewind == "init" else rewind
        self.log_sparsity = log_sparsity
        # state saved in checkpoints
        self.masks: dict[str, Tensor] = {}
        self.step = 0
        self.round = 0
        self.snapshot: dict[str, Tensor] = {}
        # runtime
        self._units: list[_Unit] = []
        self._params: dict[str, nn.Parameter] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._hooks: list[Any] = []
        self._masked_cache: tuple[Any, list[nn.Parameter], list[Tensor]] | None = None
        self._trainer: pl.Trainer | None = None
        self._end_step = end_step

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, schedule=self.schedule, targets=self.targets)

    # ----------------------------------------------------------------------------------------- selection
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve and validate the units before any weight is touched (and before a strategy shards them)."""
        self._units = self.units(pl_module)
        self._shapes = {p.name: tuple(p.param.shape) for u in self._units for p in u.parts}
        self._bind(pl_module)

    def _bind(self, model: nn.Module) -> None:
        """Point every unit part at ``model``'s current Parameter of its name: FSDP2 replaces the Parameters (by
        sharded ones of the same global shape) between ``setup`` and fit start, keeping their names; FSDP1 inserts
        ``_fsdp_wrapped_module.`` into them, which is ignored.

        Raises:
            ValueError: a parameter's shape changed since ``setup`` (FSDP1's flattened shards, ``FSDPStrategy`` on
                more than one device), which masks cannot be laid onto.
        """
        current = {_unwrapped(n): p for n, p in model.named_parameters(remove_duplicate=False)}
        for part in (p for u in self._units for p in u.parts):
            part.param = current[part.name]
            if tuple(part.param.shape) != self._shapes[part.name]:
                raise ValueError(
                    f"IterativePruning: parameter {part.name!r} has shape {tuple(part.param.shape)}, not its shape "
                    f"{self._shapes[part.name]} at setup (a flattened FSDP1 shard: FSDPStrategy on several devices); "
                    "allowed: whole parameters (DDP, one device) or FSDP2's DTensor shards (ModelParallelStrategy "
                    "with fully_shard in configure_model)"
                )
        self._params = {p.name: p.param for u in self._units for p in u.parts}
        self._masked_cache = None

    def units(self, model: nn.Module) -> list[_Unit]:
        """The pruning units of ``model`` for this configuration; raises ValueError on anything invalid."""
        if self.init_from is not None:
            return [_Unit(name, [_part(f"{name}.weight", layer.weight)]) for name, layer in
                    self.init_from.select(model).items()]  # fmt: skip
        if self.method == "heads":
            found = select_layers(
                model,
                self.targets,
                self.ignore,
                accept=lambda m: attention_kind(m) is not None,
                kind="attention (nn.MultiheadAttention, query/key/value or q_proj/k_proj/v_proj/o_proj)",
            )
            units = []
            for name, module in found.items():
                layout = attention_layout(model, name, module)
                if layout.grouped:
                    raise ValueError(
                        f"method='heads': attention {name!r} has {layout.num_kv_heads} key/value heads for "
                        f"{layout.num_heads} query heads (grouped-query attention), which head pruning does not "
                        f"support; allowed: num_kv_heads == num_heads; add {name!r} to ignore"
                    )
                if why := layout.mismatch(model):
                    raise ValueError(f"method='heads': attention {name!r} does not split into heads: {why}")
                units.append(_Unit(name, _attention_parts(layout, model), layout.head_size))
        else:
            layers = select_layers(model, self.targets, self.ignore)
            found_units = {name: self._layer_unit(name, layer) for name, layer in layers.items()}
            units = [u for u in found_units.values() if u is not None]
            if not units:
                widths = {name: layer.weight.shape[1] for name, layer in layers.items()}
                raise ValueError(
                    f"pattern {self.nm[0]}:{self.nm[1]}: no selected layer has an input width divisible by "
                    f"M={self.nm[1]} (input widths {widths}); allowed: layers whose weight.shape[1] is a "
                    f"multiple of {self.nm[1]}"
                )
        unknown = sorted(set(self.plan) - {u.name for u in units})
        if unknown:
            raise ValueError(f"plan names unknown layers {unknown}; allowed: {[u.name for u in units]}")
        return units

    def _layer_unit(self, name: str, layer: nn.Module) -> _Unit | None:
        """The pruning unit of one selected layer, or None for an N:M-incompatible layer selected by default.

        With ``method="nm"``, a layer whose input width (``weight.shape[1]``) is not divisible by M cannot hold
        the pattern: when ``targets`` is None (every Linear / Conv selected by default, as the recipes do) it is
        skipped with a logged line and stays dense; when the user named it in ``targets`` that is an error.

        Raises:
            TypeError: the weight is not floating point.
            ValueError: an N:M-incompatible layer was selected by ``targets``.
        """
        weight = layer.weight
        if not weight.is_floating_point():
            raise TypeError(f"layer {name!r} has a {weight.dtype} weight; pruning needs a float weight")
        if self.nm is not None and weight.shape[1] % self.nm[1]:
            n, m = self.nm
            if self.targets is not None:
                raise ValueError(
                    f"layer {name!r}: input dimension {weight.shape[1]} is not divisible by M={m} "
                    f"(pattern {n}:{m}); it was selected by targets={self.targets!r}: remove it from targets "
                    f"or add it to ignore"
                )
            log.warning(
                "IterativePruning: layer %r (input width %d) skipped: not divisible by M=%d (pattern %d:%d); it "
                "stays dense",
                name,
                weight.shape[1],
                m,
                n,
                m,
            )
            return None
        parts = [_part(f"{name}.weight", weight)]
        if self.method == "rows" and getattr(layer, "bias", None) is not None:
            parts.append(_part(f"{name}.bias", layer.bias))
        return _Unit(name, parts)

    # ------------------------------------------------------------------------------------------ masks
    def target(self, unit: _Unit) -> float:
        """Final sparsity of ``unit``: its plan entry, else ``sparsity``."""
        return self.plan.get(unit.name, self.sparsity)

    def compute_masks(self, level: Callable[[_Unit], float]) -> dict[str, Tensor]:
        """New masks with each unit at ``level(unit)``, ranking surviving weights only (pruned stay pruned)."""
        if self.scope == "global":
            units = self._units
            weights = [self._survivors(u.parts[0]) for u in units]
            masks = global_magnitude_masks(weights, level(units[0]))
            return {u.parts[0].name: m for u, m in zip(units, masks, strict=True)}
        masks: dict[str, Tensor] = {}
        for unit in self._units:
            s = level(unit)
            if self.method == "heads":
                parts = [(self._survivors(p).reshape(p.view), p.dim) for p in unit.parts]
                found = group_head_masks(parts, unit.head_size, s)
                masks.update({p.name: m.reshape(p.param.shape) for p, m in zip(unit.parts, found, strict=True)})
                continue
            weight = self._survivors(unit.parts[0])
            if self.method == "nm":
                mask = nm_mask(weight, *self.nm)
            elif self.method == "rows":
                mask = row_mask(weight, s)
                for p in unit.parts[1:]:
                    masks[p.name] = mask.reshape(mask.shape[0], -1)[:, 0].clone()
            else:
                mask = magnitude_mask(weight, s)
            masks[unit.parts[0].name] = mask
        return masks

    def _survivors(self, part: _Part) -> Tensor:
        w = full_tensor(part.param.detach())  # the whole weight on every rank: a sharded one is all-gathered
        old = self.masks.get(part.name)
        return w if old is None else w * old

    def prune_to(self, trainer: pl.Trainer | None, level: Callable[[_Unit], float]) -> None:
        """Compute masks at ``level``, make every rank agree, and apply them to weights and optimizer state."""
        masks = self.compute_masks(level)
        masks = {k: broadcast_(m.contiguous()) for k, m in masks.items()}  # every rank holds rank 0's masks
        self.masks = {k: m.to(self._params[k].device) for k, m in masks.items()}
        self.apply_masks(trainer)
        log.info("pruned to global sparsity %.4f", self.global_sparsity())

    @torch.no_grad()
    def apply_masks(self, trainer: pl.Trainer | None = None) -> None:
        """Zero pruned weights and, when a trainer is given, their optimizer state (momenta, Adam moments)."""
        self._remask()
        for name, mask in self.masks.items():
            for state in _optimizer_state(trainer, self._params[name]):
                state.mul_(local_like(mask.to(device=state.device, dtype=state.dtype), state))

    def global_sparsity(self) -> float:
        """Fraction of zeros over every pruned parameter, counted from the weights."""
        total = sum(p.numel() for p in self._params.values())
        zeros = sum(p.numel() - _nonzeros(p) for p in self._params.values())
        return zeros / total if total else 0.0

    # ------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._bind(pl_module)
        if self.schedule == "cubic" and self._end_step is None:
            total = int(trainer.estimated_stepping_batches)
            self._end_step = self.begin_step + max(1, int(0.75 * (total - self.begin_step)))
        fresh = not self.masks
        if fresh and self.rewind == 0:
            self.snapshot = self._whole_weights()
        if fresh and self.init_from is not None:
            self.start_from_pruner(trainer, pl_module)
        elif fresh and self.schedule == "oneshot":
            self.prune_to(trainer, self.target)
        elif not fresh:
            self.masks = {k: m.to(self._params[k].device) for k, m in self.masks.items()}
            self.apply_masks()
        self._register_hooks(trainer)

    def start_from_pruner(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Run ``init_from`` on ``model`` and hold its masks (every rank holds rank 0's)."""
        found = self.init_from.apply(model, self.init_from.calibration_batches(trainer))
        masks = {f"{name}.weight": broadcast_(mask.contiguous()) for name, mask in found.items()}
        self.masks = {k: m.to(self._params[k].device) for k, m in masks.items()}
        self.apply_masks(trainer)
        log.info("%s's masks: global sparsity %.4f", type(self.init_from).__name__, self.global_sparsity())

    def _register_hooks(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        for i, optimizer in enumerate(trainer.optimizers):
            self._hooks.append(optimizer.register_step_post_hook(self._after_step if i == 0 else self._remask))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Zero the gradients of pruned weights (runs after backward, before the update), so momenta and Adam
        moments of pruned positions stay zero and the update leaves them at exactly zero."""
        params, masks = self._masked
        grads = [p.grad for p in params]
        if params and all(g is not None for g in grads):
            torch._foreach_mul_(grads, masks)
        else:
            for g, m in zip(grads, masks, strict=True):
                if g is not None:
                    g.mul_(m)

    @torch.no_grad()
    def _remask(self, *hook_args: Any) -> None:
        """Multiply every masked parameter by its mask (one fused foreach call); also an optimizer post-hook."""
        params, masks = self._masked
        if params:
            torch._foreach_mul_(params, masks)

    @property
    def _masked(self) -> tuple[list[nn.Parameter], list[Tensor]]:
        """The masked parameters and their masks in each parameter's dtype, cached until the masks change (the
        per-step hooks then cost two fused multiplies and no allocation)."""
        cache = self._masked_cache
        if (
            cache is None
            or cache[0] is not self.masks
            or any(p.dtype != m.dtype or p.device != m.device for p, m in zip(cache[1], cache[2], strict=True))
        ):
            params = [self._params[n] for n in self.masks]
            masks = [local_like(m.to(device=p.device, dtype=p.dtype), p)  # a sharded weight: this rank's part
                     for m, p in zip(self.masks.values(), params, strict=True)]  # fmt: skip
            cache = self._masked_cache = (self.masks, params, masks)
        return cache[1], cache[2]

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._remask()
        self.step += 1
        if self.rewind is not None and self.rewind > 0 and self.step == self.rewind and not self.snapshot:
            self.snapshot = self._whole_weights()
        if self.schedule != "cubic" or not self.begin_step <= self.step <= self._end_step:
            return
        if (self.step - self.begin_step) % self.frequency == 0:
            self.prune_to(self._trainer, self._cubic_level)

    def _cubic_level(self, unit: _Unit) -> float:
        n = max(1, (self._end_step - self.begin_step) // self.frequency)
        final = self.target(unit)
        initial = min(self.initial_sparsity, final)
        return cubic_sparsity(self.step, final, n, initial, self.begin_step, self.frequency)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule == "iterative" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            levels = {u.name: geometric_rounds(self.target(u), self.rate) for u in self._units}
            if self.round < max(map(len, levels.values()), default=0):
                r = self.round
                self.prune_to(
                    trainer, lambda u: levels[u.name][min(r, len(levels[u.name]) - 1)] if levels[u.name] else 0.0
                )
                self.round += 1
                self._rewind(trainer)
        if self.log_sparsity:
            pl_module.log_dict(self.sparsity_metrics(), on_step=False, on_epoch=True)

    @torch.no_grad()
    def _rewind(self, trainer: pl.Trainer) -> None:
        if self.rewind is None or not self.snapshot:
            return
        for name, param in self._params.items():
            param.copy_(local_like(self.snapshot[name].to(param.device), param))
            for state in _optimizer_state(trainer, param):
                state.zero_()
        self._remask()

    def sparsity_metrics(self) -> dict[str, float]:
        """``sparsity/<unit>`` (zeros in the unit's parameters) and ``sparsity/global``, from the weights."""
        metrics = {}
        for unit in self._units:
            numel = sum(p.param.numel() for p in unit.parts)
            nnz = sum(_nonzeros(p.param) for p in unit.parts)
            metrics[f"sparsity/{unit.name}"] = 1.0 - nnz / numel
        metrics["sparsity/global"] = self.global_sparsity()
        return metrics

    def _whole_weights(self) -> dict[str, Tensor]:
        """A copy of every pruned parameter, whole (a sharded one all-gathered)."""
        return {n: full_tensor(p.detach()).clone() for n, p in self._params.items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "step": self.step,
            "round": self.round,
            "snapshot": {k: v.cpu() for k, v in self.snapshot.items()},
            "end_step": self._end_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self.step = int(state_dict["step"])
        self.round = int(state_dict["round"])
        self.snapshot = dict(state_dict["snapshot"])
        self._end_step = state_dict.get("end_step", self.end_step)


def check_pruning_start(init_from: Any, schedule: str, targets: Any, ignore: Any, plan: Any) -> None:
    """Raise TypeError / ValueError unless ``init_from`` (None, or a one-shot pruner) can start IterativePruning."""
    if init_from is None:
        return
    from lightning_compress.callbacks.base import OneShotPruning

    if not isinstance(init_from, OneShotPruning) or getattr(init_from, "bits", None) is not None:
        raise TypeError(
            f"init_from={init_from!r} cannot start IterativePruning; allowed: None, or a one-shot pruner that only "
            "prunes (SparseGPTPrune without bits, WandaPrune)"
        )
    if schedule != "oneshot" or targets is not None or ignore is not None or plan is not None:
        raise ValueError(
            f"init_from holds the pruner's masks: schedule={schedule!r}, targets={targets!r}, ignore={ignore!r}, "
            f"plan={plan!r}; allowed: schedule='oneshot' and targets, ignore, plan None (the pruner selects the layers)"
        )


def _unwrapped(name: str) -> str:
    """A parameter name without the wrapper segments FSDP1 and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _nonzeros(param: Tensor) -> int:
    """The number of non-zero entries of the whole ``param`` (summed over the shards of a sharded one)."""
    return int(full_tensor(torch.count_nonzero(param.detach())))


def _optimizer_state(trainer: pl.Trainer | None, param: nn.Parameter) -> list[Tensor]:
    """The optimizer state tensors shaped like ``param`` (momentum buffers, Adam moments) in ``trainer``."""
    optimizers = trainer.optimizers if trainer is not None else []
    return [
        v
        for opt in optimizers
        for v in opt.state.get(param, {}).values()
        if isinstance(v, Tensor) and v.shape == param.shape
    ]
