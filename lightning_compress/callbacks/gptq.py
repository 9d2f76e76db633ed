"""GPTQFinalize: GPTQ weight quantization (Frantar et al. 2023) at fit end or one-shot on any model."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.budget import CompressionPlan, as_plan, exact_names
from lightning_compress.calibration.gptq import gptq_model, is_gptq_layer, weight_matrix
from lightning_compress.callbacks.base import CalibrationCallback, check_group_size
from lightning_compress.functional.gptq import GPTQOptions, GPTQResult
from lightning_compress.nn.fake_quant import WeightQuantizer, fake_quant_class, is_fake_quant
from lightning_compress.nn.quantized import QuantizedLayer, QuantizedWeight
from lightning_compress.nn.select import select_layers

log = logging.getLogger(__name__)

HESSIAN_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def on_grid(
    layer: nn.Module, codes: Tensor, scale: Tensor, zero_point: Tensor, options: GPTQOptions, pruned: Tensor | None
) -> tuple[nn.Module, QuantizedLayer]:
    """The fake-quant twin of ``layer`` frozen at a solver's grid (its weight already equals the dequantized codes),
    and the :class:`QuantizedLayer` export reads; ``pruned`` marks weights that were zero before (kept zero)."""
    fmt = "fp8" if options.method == "fp8" else "int"
    weight = QuantizedWeight(codes.reshape(layer.weight.shape), scale, None if options.symmetric else zero_point,
                             options.bits, options.group_size, fmt)  # fmt: skip
    wq = WeightQuantizer.from_quantized(layer.weight, weight, pruned)
    return fake_quant_class(layer).from_module(layer, wq), QuantizedLayer(weight)


class GPTQFinalize(CalibrationCallback):
    """Quantize the weights of every selected Linear / Conv2d with GPTQ after training (or on a pretrained model).

    Per layer, ``H = 2 XᵀX`` is summed over the calibration tokens by a hook (all-reduced with ``sum`` under DDP)
    and the weight is quantized column by column, each column's rounding error spread onto the columns not yet
    quantized through ``H⁻¹`` (Cholesky, dampened by ``percdamp · mean(diag H)``; raised ×10 with a warning while
    the factorisation fails). Transformers are calibrated true-sequentially, block by block: each layer sees inputs
    that already went through the quantized layers before it. Afterwards each layer is a fake-quant layer frozen at
    its GPTQ grid (weights exactly on the grid; the same weight keys, so checkpoints load into the plain model; a
    pruned layer, one with at least 5% exact zeros, keeps every zero, the kept weights compensating), and
    :attr:`quantized` holds each layer's codes, scales and zero-points (:class:`QuantizedLayer`) for export. The
    solver arguments (``bits`` to ``clip_search``, ``method``, ``scale_dtype``) are kept, validated, as
    :attr:`options`, one :class:`~lightning_compress.functional.gptq.GPTQOptions`.

    YAML (``conf/compress/gptq_int4.yaml``)::

        # @package _global_
        callbacks:
          gptq:
            _target_: lightning_compress.GPTQFinalize
            bits: 4
            act_order: true

    Python::

        trainer = L.Trainer(callbacks=[GPTQFinalize(bits=4, group_size=128)])  # at fit end
        GPTQFinalize(bits=4, act_order=True).apply(hf_model, [tokenizer(texts, return_tensors="pt")])  # one-shot

    Args:
        bits: weight code width, 2..8.
        group_size: one scale per ``group_size`` inputs of each row (it must divide every layer's input width);
            None for one per output channel.
        symmetric: symmetric (zero-point 0) or asymmetric; None (default): asymmetric at 2-4 bits (better, and the
            int4 export takes zero-points), symmetric at 5-8 bits (what the int8 kernels take).
        act_order: quantize columns in descending ``diag(H)`` order (default; better on every model measured).
        static_groups: with groups and ``act_order``, fix the group scales up front so groups stay contiguous
            (default: exportable ``(out, in / group_size)`` scales).
        percdamp: relative dampening of the Hessian's diagonal.
        block_size: columns per lazy-update block.
        clip_search: choose each channel's / group's range by the clipping search (the reference's ``mse``
            quantizer) instead of min-max (default: SmolLM2 4-bit per channel perplexity 53.3 with it, 55.2 without).
        true_sequential: calibrate each group of layers after the ones before it are quantized.
        hessian_dtype: ``"float64"`` or ``"float32"`` running sums of ``H``.
        method: the grid: ``"linear"`` (signed integers) or ``"fp8"`` (FP8 E4M3 values with one scale
            ``max|w| / 448`` per channel or group; ``bits=8``, symmetric: what FP8 serving kernels take).
        scale_dtype: round the scales to ``"float16"`` (or ``"bfloat16"``) as GPTQ makes them, so a format that
            stores fp16 scales holds this grid exactly (GGUF Q4_0 / Q8_0 with ``group_size=32``); None: float32.
        num_batches, calibration_data, input_fn: calibration batches at fit end (see :class:`CalibrationCallback`).
        targets, ignore: regexes over layer names (default: every Linear and Conv2d).
        plan: a compression plan (:class:`~lightning_compress.budget.CompressionPlan` or its YAML): quantize exactly
            its layers whose option has bits, each at its option's bits, group size and symmetry (``bits``,
            ``group_size`` and ``symmetric`` are then not used; the other solver arguments apply to every layer;
            ``targets`` and ``ignore`` must stay unset). A layer the plan also prunes N:M keeps its zeros.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = None,
        symmetric: bool | None = None,
        act_order: bool = True,
        static_groups: bool = True,
        percdamp: float = 0.01,
        block_size: int = 128,
        clip_search: bool = True,
        true_sequential: bool = True,
        hessian_dtype: str = "float64",
        method: str = "linear",
        scale_dtype: str | None = None,
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Any = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        plan: str | Path | CompressionPlan | None = None,
    ) -> None:
        self.plan = None if plan is None else as_plan(plan)
        if self.plan is not None:
            if targets is not None or ignore is not None:
                raise ValueError(f"plan= names the layers; targets={targets!r}, ignore={ignore!r} must stay None")
            if not self.plan.quantized():
                raise ValueError(f"plan quantizes no layer (its options: {sorted(self.plan.counts())})")
            targets = exact_names(self.plan.quantized())
        super().__init__(num_batches, calibration_data, input_fn, targets, ignore)
        if symmetric is None:  # int4 and below: zero-points (weight-only kernels take them); 5-8 bits: int8 kernels
            symmetric = (isinstance(bits, int) and bits > 4) or method == "fp8"
        self.options = GPTQOptions(
            bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order,
            static_groups=static_groups, percdamp=percdamp, block_size=block_size, clip_search=clip_search,
            method=method, scale_dtype=scale_dtype,
        )  # fmt: skip
        if hessian_dtype not in HESSIAN_DTYPES:
            raise ValueError(f"hessian_dtype={hessian_dtype!r} is not supported; allowed: {list(HESSIAN_DTYPES)}")
        self.true_sequential, self.hessian_dtype = true_sequential, HESSIAN_DTYPES[hessian_dtype]
        self.layer_options = None if self.plan is None else {
            n: o.gptq_options(self.options) for n, o in self.plan.quantized().items()}  # fmt: skip

    def options_of(self, name: str) -> GPTQOptions:
        """The solve of layer ``name``: its plan option's, or :attr:`options`."""
        return self.options if self.layer_options is None else self.layer_options[name]

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers GPTQ will quantize; raises ValueError before anything changes when one cannot be."""
        layers = select_layers(
            model, self.targets, self.ignore, accept=lambda m: is_gptq_layer(m) and not is_fake_quant(m),
            kind="Linear / Conv2d (groups=1)",
        )  # fmt: skip
        if self.plan is not None and len(layers) != len(self.layer_options):
            missing = sorted(set(self.layer_options) - set(layers))
            raise ValueError(f"plan names layers this model has no quantizable Linear / Conv2d for: {missing}")
        for name, module in layers.items():
            check_group_size({name: weight_matrix(module).shape[1]}, self.options_of(name).group_size)
        return layers

    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, QuantizedLayer]:
        """GPTQ-quantize ``model``'s selected layers in place on ``batches``; returns ``{name: QuantizedLayer}``.

        Each block's layers become fake-quant layers as soon as the block is done (so a streamed model can write
        and free it, :mod:`lightning_compress.streaming`); an error midway puts every layer and weight back.
        """
        layers = self.select(model)
        batches = self.model_inputs(model, batches)
        with self.swapping(model, layers) as swap:

            def finish(results: dict[str, GPTQResult], pruned: dict[str, Tensor | None]) -> None:
                swap({name: on_grid(layers[name], r.codes, r.scale, r.zero_point, self.options_of(name), pruned[name])
                      for name, r in results.items()})  # fmt: skip

            options = self.options if self.layer_options is None else self.layer_options
            gptq_model(model, layers, batches, options, self.true_sequential, self.hessian_dtype, finish)
        bits = sorted({self.options_of(n).bits for n in swap.names})
        log.info("GPTQFinalize: %d layers at %s bits", len(swap.names), "/".join(map(str, bits)))
        return swap.result()
