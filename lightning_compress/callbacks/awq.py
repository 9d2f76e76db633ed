"""AWQCalibrate: activation-aware weight quantization (Lin et al. 2024) at fit end or one-shot on any model."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.calibration.awq import AWQGroup, awq_model
from lightning_compress.callbacks.base import CalibrationCallback, check_group_size
from lightning_compress.callbacks.gptq import on_grid
from lightning_compress.functional.gptq import GPTQOptions
from lightning_compress.functional.quant import compute_qparams, dequantize, quantize
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.quantized import QuantizedLayer
from lightning_compress.nn.select import select_layers

log = logging.getLogger(__name__)


class AWQCalibrate(CalibrationCallback):
    """Scale each group of Linears sharing an input by ``s = mean|X|^α`` (``α`` searched per group on the output of
    the module holding it), fold ``1/s`` into the norm or Linear producing that input (SmoothQuant's folds), clip
    each weight's range by a search on its output error, then round to nearest — or leave the scaled float weights
    to :class:`~lightning_compress.GPTQFinalize` (``quantize=False``; AWQ + GPTQ, whose clipping search then
    chooses the ranges).

    Block by block on the calibration engine: each block is calibrated on the outputs of the blocks before it. A
    language model's output embeddings are left out by default. With ``quantize`` the layers become fake-quant layers
    frozen at their grid (as after GPTQ), with :attr:`quantized` for export.

    YAML (``conf/compress/awq_int4.yaml``)::

        callbacks:
          awq:
            _target_: lightning_compress.AWQCalibrate
            bits: 4

    Python::

        AWQCalibrate(bits=4).apply(llm, calibration_batches)          # AWQ, round to nearest
        AWQCalibrate(bits=4, quantize=False).apply(llm, batches)      # AWQ scales only, then:
        GPTQFinalize(bits=4).apply(llm, batches)                      # GPTQ on the scaled weights

    Args:
        bits: weight code width, 2..8.
        group_size: one scale per ``group_size`` inputs (must divide every layer's input width); None per channel.
        symmetric: symmetric (zero-point 0) or asymmetric (AWQ's default) grid.
        grid: steps of the ``α`` search in ``[0, 1)``.
        clip: run AWQ's clipping search (against round to nearest). None (default): when ``quantize``; AWQ +
            GPTQ leaves the ranges to GPTQ's own clipping search, which measures better (SmolLM2 W4 per channel,
            same data: perplexity 51.1 without AWQ's clipping, 54.3 with both searches).
        quantize: round to nearest at the end (False: keep the float weights for GPTQ).
        max_search_tokens: real tokens the searches run on (whole batches, at least one), across all DDP ranks.
        scale_dtype: round the final scales to ``"float16"`` / ``"bfloat16"`` (see :class:`GPTQFinalize`).
        num_batches, calibration_data, input_fn: calibration batches at fit end (see :class:`CalibrationCallback`).
        targets, ignore: regexes over Linear layer names.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = None,
        symmetric: bool = False,
        grid: int = 20,
        clip: bool | None = None,
        quantize: bool = True,
        max_search_tokens: int = 4096,
        scale_dtype: str | None = None,
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Any = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_batches, calibration_data, input_fn, targets, ignore)
        self.options = GPTQOptions(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
        for name, value in (("grid", grid), ("max_search_tokens", max_search_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(quantize, bool):
            raise ValueError(f"quantize must be a bool (True or False), got {quantize!r}")
        if clip is not None and not isinstance(clip, bool):
            raise ValueError(f"clip must be a bool (True or False) or None (= quantize), got {clip!r}")
        clip = quantize if clip is None else clip
        self.grid, self.clip, self.quantize, self.max_search_tokens = grid, clip, quantize, max_search_tokens
        self.groups: list[AWQGroup] = []

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The Linears AWQ will scale; raises ValueError before anything changes when one cannot be."""
        layers = select_layers(model, self.targets, self.ignore, kind="Linear",
                               accept=lambda m: isinstance(m, nn.Linear) and not is_fake_quant(m))  # fmt: skip
        for name, layer in layers.items():
            if not layer.weight.is_floating_point():
                raise TypeError(f"layer {name!r} has a {layer.weight.dtype} weight; allowed: float Linears")
        check_group_size({n: m.in_features for n, m in layers.items()}, self.options.group_size)
        return layers

    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, QuantizedLayer]:
        """AWQ ``model``'s selected Linears in place on ``batches``; returns ``{name: QuantizedLayer}`` (empty with
        ``quantize=False``). An error midway restores every weight."""
        layers = self.select(model)
        batches = self.model_inputs(model, batches)
        o = self.options

        def rounded(name: str) -> tuple[nn.Module, QuantizedLayer]:
            layer = layers[name]
            w = layer.weight.detach().clone()
            qp = compute_qparams(w, o.bits, o.symmetric, 0 if o.group_size is None else None, o.group_size,
                                 scale_dtype=o.scale_dtype)  # fmt: skip
            codes = quantize(w, qp.scale, qp.zero_point, o.bits)
            layer.weight.copy_(dequantize(codes, qp.scale, qp.zero_point).to(w.dtype))
            scale, zero = qp.scale.reshape(w.shape[0], -1), qp.zero_point.reshape(w.shape[0], -1)
            return on_grid(layer, codes, scale, zero, o, w == 0)

        with self.swapping(model, layers) as swap, torch.no_grad():

            def finish(names: list[str]) -> None:  # a block is done: round its (scaled) weights onto the grid
                if self.quantize:
                    swap({name: rounded(name) for name in names})

            self.groups = awq_model(model, layers, batches, o.bits, o.group_size, o.symmetric, self.grid, self.clip,
                                    self.max_search_tokens, finish)  # fmt: skip
        scaled = sum(g.s is not None for g in self.groups)
        log.info("AWQCalibrate: %d layers, %d of %d groups scaled", len(layers), scaled, len(self.groups))
        return swap.result()
