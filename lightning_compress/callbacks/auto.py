"""AutoCompress: give a budget, get a per-layer plan, then GPTQ / SparseGPT as each layer's option says."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_compress.budget import (
    DEFAULT_OPTIONS,
    CompressionPlan,
    OptionScan,
    as_plan,
    mean_loss,
    option_scan,
    output_change,
    output_rows,
    parse_budget,
    parse_option,
    supervised,
)
from lightning_compress.callbacks.base import CalibrationCallback
from lightning_compress.callbacks.gptq import GPTQFinalize
from lightning_compress.callbacks.sparsegpt import SparseGPTPrune
from lightning_compress.functional.gptq import GPTQOptions
from lightning_compress.nn.quantized import QuantizedLayer
from lightning_compress.nn.select import restored_on_error

log = logging.getLogger(__name__)


class AutoCompress(CalibrationCallback):
    """Compress to a budget: search each layer's option (:mod:`lightning_compress.budget`), then apply the plan.

    On the calibration batches (at fit end, or one-shot through :meth:`apply`): one pass with gradients predicts
    every layer's loss increase under every option (:func:`~lightning_compress.budget.option_scan`); the exact
    knapsack picks the plan within the budget (:meth:`~lightning_compress.budget.OptionScan.plan`), written to
    ``save_plan``; then ``SparseGPTPrune(plan=...)`` prunes the N:M layers and ``GPTQFinalize(plan=...)`` quantizes
    the others (and the kept weights of ``N:M_int<b>`` layers), on the same batches. The loss is measured before and
    after on those batches (:attr:`measured_loss_increase`, against :attr:`plan`'s ``predicted_loss``), and the
    :class:`~lightning_compress.CompressionReport` shows the plan. An error midway puts every weight back.

    YAML (``conf/compress/auto.yaml``; ``python scripts/ptq.py lm=smollm2 +compress=auto budget=60MB``)::

        # @package _global_
        budget: null
        callbacks:
          auto:
            _target_: lightning_compress.AutoCompress
            budget: ${budget}

    Python::

        AutoCompress(budget="8GB").apply(llm, calibration_batches)       # one-shot
        trainer = L.Trainer(callbacks=[AutoCompress(budget="6x")])       # at fit end, 6x smaller
        AutoCompress(plan="plan.yaml")                                   # apply a plan searched before

    Args:
        budget: the whole model's weights must fit in this many bytes (``8e9``, ``"8GB"``, ``"500MiB"``), or be
            this many times smaller than now (``"4x"``).
        max_loss_increase: or: the least bytes whose predicted loss increase (mean calibration loss per target; for
            a causal LM ``ln`` of the perplexity ratio) stays within this.
        options: candidate option names (:func:`~lightning_compress.budget.parse_option`).
        plan: apply this plan (a :class:`~lightning_compress.budget.CompressionPlan` or its YAML) instead of
            searching; no budget then.
        save_plan: write the searched plan here (YAML), or None.
        micro_batch: rows per forward / backward of the scan.
        tie_shared_inputs: layers reading the same input (q/k/v, gate/up) share one option.
        act_order, clip_search, percdamp: GPTQ's settings, for the scan's estimate and the final solve alike.
        num_batches, calibration_data, input_fn: calibration batches at fit end (see :class:`CalibrationCallback`).
        targets, ignore: regexes over layer names (default: every Linear and Conv2d).
    """

    def __init__(
        self,
        budget: str | int | float | None = None,
        max_loss_increase: float | None = None,
        options: Sequence[str] = DEFAULT_OPTIONS,
        plan: str | Path | CompressionPlan | None = None,
        save_plan: str | None = None,
        micro_batch: int = 4,
        tie_shared_inputs: bool = True,
        act_order: bool = True,
        clip_search: bool = True,
        percdamp: float = 0.01,
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Any = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_batches, calibration_data, input_fn, targets, ignore)
        budgets = {k: v for k, v in {"budget": budget, "max_loss_increase": max_loss_increase}.items()
                   if v is not None}  # fmt: skip
        if plan is None and len(budgets) != 1:
            raise ValueError(f"give exactly one of budget, max_loss_increase (or a plan); got {budgets or 'none'}")
        if plan is not None and (budgets or targets is not None or ignore is not None):
            raise ValueError(f"plan= is the whole recipe; leave budget, max_loss_increase, targets, ignore unset "
                             f"(got {budgets})")  # fmt: skip
        self.budget, self.ratio = parse_budget(budget) if budget is not None else (None, None)
        if max_loss_increase is not None and (isinstance(max_loss_increase, bool)
                                              or not isinstance(max_loss_increase, (int, float))
                                              or not max_loss_increase >= 0):  # fmt: skip
            raise ValueError(f"max_loss_increase must be a number >= 0, got {max_loss_increase!r}")
        self.options = tuple(parse_option(o).name for o in options)
        self.max_loss_increase = max_loss_increase
        self.plan = None if plan is None else as_plan(plan)
        self.save_plan, self.micro_batch, self.tie_shared_inputs = save_plan, micro_batch, tie_shared_inputs
        self.gptq = GPTQOptions(act_order=act_order, static_groups=True, clip_search=clip_search, percdamp=percdamp)
        self.scan: OptionScan | None = None
        self.masks: dict[str, Any] = {}
        self.measured_loss_increase: float | None = None

    def search(self, model: nn.Module, batches: Sequence[Any]) -> CompressionPlan:
        """The plan for ``model`` within the budget, from an option scan on ``batches`` (kept in :attr:`scan`)."""
        self.scan = option_scan(model, batches, self.options, self.targets, self.ignore, micro_batch=self.micro_batch,
                                tie_shared_inputs=self.tie_shared_inputs, gptq=self.gptq)  # fmt: skip
        return self.scan.plan(budget_bytes=self.budget, ratio=self.ratio, max_loss_increase=self.max_loss_increase)

    def solvers(self, plan: CompressionPlan) -> list[CalibrationCallback]:
        """The callbacks that apply ``plan``: SparseGPT on its N:M layers, then GPTQ on its quantized ones."""
        common = {"num_batches": None, "input_fn": self.input_fn, "percdamp": self.gptq.percdamp}
        out: list[CalibrationCallback] = []
        if plan.sparse():
            out.append(SparseGPTPrune(plan=plan, **common))
        if plan.quantized():
            out.append(GPTQFinalize(plan=plan, act_order=self.gptq.act_order, clip_search=self.gptq.clip_search,
                                    **common))  # fmt: skip
        return out

    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, QuantizedLayer]:
        """Search (unless a plan was given), save the plan, apply it to ``model`` in place; returns the quantized
        layers (also in :attr:`quantized`; the N:M masks in :attr:`masks`)."""
        batches = list(batches)
        plan = self.plan if self.plan is not None else self.search(model, batches)
        solvers = self.solvers(plan)
        for solver in solvers:
            solver.select(model)  # every check before the first weight changes
        if self.save_plan:
            log.info("AutoCompress: plan written to %s", plan.save(self.save_plan))
        labelled = supervised(model, self.model_inputs(model, batches[:1])[0] if self.input_fn else batches[0])
        before = mean_loss(model, batches, micro_batch=self.micro_batch) if labelled else output_rows(
            model, batches, self.micro_batch)  # fmt: skip
        with restored_on_error(model):
            for solver in solvers:
                result = solver.apply(model, batches)
                if isinstance(solver, SparseGPTPrune):
                    self.masks = result
                else:
                    self.quantized = result
        after = (mean_loss(model, batches, micro_batch=self.micro_batch) - before if labelled
                 else output_change(before, output_rows(model, batches, self.micro_batch)))  # fmt: skip
        self.plan, self.measured_loss_increase = plan, after
        log.info("AutoCompress: %s; loss increase predicted %.4g, measured %.4g on the calibration batches",
                 plan.counts(), plan.predicted_loss, after)  # fmt: skip
        return self.quantized
