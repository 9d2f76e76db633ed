"""SparseGPTPrune: one-shot SparseGPT pruning (Frantar & Alistarh 2023), optionally jointly quantized, at fit end or
through ``apply``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_compress.budget import CompressionPlan, as_plan, exact_names
from lightning_compress.calibration.sparsegpt import sparsegpt_model
from lightning_compress.callbacks.base import OneShotPruning, Swap, check_group_size
from lightning_compress.callbacks.gptq import HESSIAN_DTYPES, on_grid
from lightning_compress.functional.gptq import GPTQOptions
from lightning_compress.functional.sparsegpt import SparseGPTResult

log = logging.getLogger(__name__)


class SparseGPTPrune(OneShotPruning):
    """Prune a model's Linears one-shot with SparseGPT: GPTQ's Hessian ``H = 2 XᵀX`` and column loop choose the
    weights to drop (saliency ``w² / [H⁻¹]_jj²`` of the current weights) and spread each dropped weight's error onto
    the columns not yet solved, so the kept weights compensate; no retraining.

    Transformers are pruned block by block, true-sequentially (each layer on inputs from the already-pruned layers
    before it). The pruned weights are exact zeros: ``IterativePruning`` holds them through fine-tuning and
    ``export_for_inference`` stores a 2:4 result as 2:4 layers. With ``bits`` the kept weights are also quantized in
    the same pass (joint 2:4 + int4): the layers become fake-quant layers frozen at their grid, as after
    :class:`~lightning_compress.GPTQFinalize`, with :attr:`quantized` for export.

    YAML (``conf/compress/sparsegpt_24.yaml``)::

        callbacks:
          sparsegpt:
            _target_: lightning_compress.SparseGPTPrune
            pattern: "2:4"

    Python::

        SparseGPTPrune(sparsity=0.5).apply(llm, calibration_batches)   # one-shot, unstructured 50%
        SparseGPTPrune(pattern="2:4", bits=4).apply(llm, calibration_batches)  # 2:4 and 4-bit in one pass
        # or prune, then GPTQ with its act-order and clipping search (it keeps every zero: still 2:4):
        SparseGPTPrune(pattern="2:4").apply(llm, batches); GPTQFinalize(bits=4).apply(llm, batches)

    Args:
        sparsity: the fraction removed, in ``[0, 1)``, chosen per block of ``block_size`` columns over all rows;
            None for 0.5. With ``pattern`` it must stay unset.
        pattern: ``"N:M"`` (e.g. ``"2:4"``) along the inputs, or None for unstructured.
        bits: also quantize the kept weights to this width (2..8); None prunes only.
        group_size: with ``bits``, one scale per ``group_size`` inputs (fixed up front: static groups); None per
            channel.
        symmetric: with ``bits``, symmetric (zero-point 0) or asymmetric.
        percdamp, block_size, true_sequential, hessian_dtype: as for :class:`~lightning_compress.GPTQFinalize`.
        num_batches, calibration_data, input_fn: calibration batches at fit end (see ``CalibrationCallback``).
        targets, ignore: regexes over Linear layer names.
        plan: a compression plan (:class:`~lightning_compress.budget.CompressionPlan` or its YAML): prune exactly its
            layers whose option has an N:M pattern, to that pattern, without quantizing (``GPTQFinalize(plan=...)``
            then quantizes the kept weights of the ``N:M_int<b>`` ones, keeping every zero); ``sparsity``,
            ``pattern``, ``bits``, ``targets`` and ``ignore`` must stay unset.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str | None = None,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool = True,
        percdamp: float = 0.01,
        block_size: int = 128,
        true_sequential: bool = True,
        hessian_dtype: str = "float64",
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Any = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        plan: str | Path | CompressionPlan | None = None,
    ) -> None:
        self.plan = None if plan is None else as_plan(plan)
        if self.plan is not None:
            given = {k: v for k, v in {"sparsity": sparsity, "pattern": pattern, "bits": bits, "targets": targets,
                                       "ignore": ignore}.items() if v is not None}  # fmt: skip
            if given:
                raise ValueError(f"plan= sets the layers and their pattern; {given} must stay None")
            sparse = self.plan.sparse()
            if not sparse:
                raise ValueError(f"plan prunes no layer (its options: {sorted(self.plan.counts())})")
            patterns = sorted({f"{o.nm[0]}:{o.nm[1]}" for o in sparse.values() if o.nm})
            if len(patterns) > 1:
                raise ValueError(f"plan uses N:M patterns {patterns}; SparseGPTPrune(plan=...) takes one")
            pattern, targets = patterns[0], exact_names(sparse)
        super().__init__(sparsity, pattern, num_batches, calibration_data, input_fn, targets, ignore)
        if bits is None and (group_size is not None or symmetric is not True):
            raise ValueError(
                f"group_size={group_size!r}, symmetric={symmetric!r} need bits (joint quantization); allowed: "
                "set bits=2..8, or leave group_size=None and symmetric=True to prune only"
            )
        self.options = GPTQOptions(bits=4 if bits is None else bits, group_size=group_size, symmetric=symmetric,
                                   static_groups=group_size is not None, percdamp=percdamp,
                                   block_size=block_size)  # fmt: skip
        if self.nm is not None and block_size % self.nm[1]:
            raise ValueError(f"block_size={block_size} must be a multiple of M={self.nm[1]} (pattern {pattern!r})")
        if hessian_dtype not in HESSIAN_DTYPES:
            raise ValueError(f"hessian_dtype={hessian_dtype!r} is not supported; allowed: {list(HESSIAN_DTYPES)}")
        self.bits, self.true_sequential, self.hessian_dtype = bits, true_sequential, HESSIAN_DTYPES[hessian_dtype]

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The Linears to prune; also checks that ``group_size`` divides every input width."""
        layers = super().select(model)
        check_group_size({n: m.in_features for n, m in layers.items()}, self.options.group_size)
        return layers

    def prune(self, model: nn.Module, layers: dict[str, nn.Module], batches: list[Any], swap: Swap) -> None:
        """SparseGPT on the engine's walk (:func:`~lightning_compress.calibration.sparsegpt.sparsegpt_model`); with
        ``bits``, each block's layers then become fake-quant layers frozen at their grid."""
        quantize = self.bits is not None

        def finish(results: dict[str, SparseGPTResult]) -> None:
            built = {}
            if quantize:
                built = {name: on_grid(layers[name], r.codes, r.scale, r.zero_point, self.options, ~r.mask)
                         for name, r in results.items()}  # fmt: skip
            swap(built, {name: r.mask for name, r in results.items()})

        sparsegpt_model(model, layers, batches, self.sparsity, self.nm, self.options, quantize, self.true_sequential,
                        self.hessian_dtype, finish)  # fmt: skip
