"""SmoothQuantCalibrate: SmoothQuant (Xiao et al. 2023) + W8A8 at fit end or one-shot on any model."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_compress.calibration.smoothquant import SmoothedGroup, smoothquant_model
from lightning_compress.callbacks.base import CalibrationCallback
from lightning_compress.functional.checks import check_patterns
from lightning_compress.functional.quant import check_bits, quant_range
from lightning_compress.nn.fake_quant import (
    ACT_GRANULARITIES,
    FakeQuantLinear,
    SymmetricActQuantizer,
    WeightQuantizer,
    is_fake_quant,
)
from lightning_compress.nn.quantized import QuantizedLayer
from lightning_compress.nn.select import select_layers

log = logging.getLogger(__name__)


class SmoothQuantCalibrate(CalibrationCallback):
    """Migrate activation outliers into the weights (SmoothQuant), then quantize the Linears to W8A8.

    Calibration keeps a running per-input-channel ``max |X_j|`` of every selected Linear (all-reduced with ``max``
    under DDP). Linears reading the same tensor form a group with one factor per channel,
    ``s_j = max|X_j|^α / max|W_j|^(1−α)``: ``1/s`` is folded into the LayerNorm / RMSNorm / Linear that produced the
    tensor (found automatically, or restricted by ``mappings``) and ``s`` into the group's weights. A fold is kept
    only if the model's outputs on a calibration batch stay the same; where nothing can absorb ``1/s`` (e.g. the
    input of an MLP's second Linear, or a post-LN BERT whose norm output is also the residual) the layer keeps an
    explicit per-channel ``x / s``. Then every selected Linear becomes a fake-quant layer with int8 per-channel
    symmetric weights and int8 symmetric activations: ``act_granularity="token"`` (dynamic, one scale per token) or
    ``"tensor"`` (static, calibrated). ``alpha=None`` skips smoothing (plain W8A8, the baseline).

    YAML (``conf/compress/smoothquant_w8a8.yaml``)::

        # @package _global_
        callbacks:
          smoothquant:
            _target_: lightning_compress.SmoothQuantCalibrate
            alpha: 0.5
            act_granularity: token

    Python::

        trainer = L.Trainer(callbacks=[SmoothQuantCalibrate(alpha=0.5)])  # at fit end
        SmoothQuantCalibrate(act_granularity="tensor").apply(hf_model, [tokenizer(texts, return_tensors="pt")])

    Args:
        alpha: migration strength in ``[0, 1]``; None for no smoothing.
        bits, act_bits: weight and activation code widths (8 for W8A8).
        act_granularity: ``"token"`` (dynamic per token) or ``"tensor"`` (static per tensor).
        explicit_scales: smooth groups with no foldable producer through an explicit ``x / s``; False leaves them.
        mappings: ``[[producer regex, consumers regex], ...]`` to restrict folding; None finds them automatically.
        convert: put the weights on their int8 grid (and keep the codes in :attr:`exported`).
        num_batches, calibration_data, input_fn: calibration batches at fit end (see :class:`CalibrationCallback`).
        targets, ignore: regexes over Linear names (default: every Linear).
    """

    def __init__(
        self,
        alpha: float | None = 0.5,
        bits: int = 8,
        act_bits: int = 8,
        act_granularity: str = "token",
        explicit_scales: bool = True,
        mappings: Sequence[Sequence[str]] | None = None,
        convert: bool = True,
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Any = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_batches, calibration_data, input_fn, targets, ignore)
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1
        ):
            raise ValueError(f"alpha must be a number in [0, 1] or None (no smoothing), got {alpha!r}")
        if act_granularity not in ACT_GRANULARITIES:
            raise ValueError(
                f"act_granularity={act_granularity!r} is not supported; allowed: {list(ACT_GRANULARITIES)}"
            )
        for pair in mappings or []:
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(f"mappings must hold [producer regex, consumers regex] pairs, got {pair!r}")
            check_patterns("mappings", list(pair))
        self.alpha, self.bits, self.act_bits = alpha, check_bits(bits), check_bits(act_bits, "act_bits")
        self.act_granularity, self.explicit_scales, self.convert = act_granularity, explicit_scales, convert
        self.mappings = None if mappings is None else [tuple(p) for p in mappings]

    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, QuantizedLayer]:
        """Smooth and W8A8-quantize ``model``'s selected Linears in place; returns ``{name: QuantizedLayer}``.

        Block by block (:func:`~lightning_compress.calibration.smoothquant.smoothquant_model`); each block's layers
        become fake-quant layers once the block is done, and an error midway puts every layer and weight back.
        """
        accept = lambda m: isinstance(m, nn.Linear) and not is_fake_quant(m)  # noqa: E731
        layers = select_layers(model, self.targets, self.ignore, accept=accept, kind="Linear")
        batches = self.model_inputs(model, batches)
        with self.swapping(model, layers) as swap:

            def finish(smoothed: list[SmoothedGroup]) -> None:
                built = {}
                for g in smoothed:
                    absmax = g.absmax if g.smoothing is None else g.absmax / g.smoothing.s
                    for name in g.group.layers:
                        layer = self._fake_quant(layers[name], absmax, g.smoothing)
                        built[name] = (layer, layer.quantized())
                swap(built)

            smoothquant_model(model, layers, batches, finish, self.alpha, self.explicit_scales, self.mappings)
        log.info("SmoothQuantCalibrate: %d Linears to W%dA%d", len(swap.names), self.bits, self.act_bits)
        return swap.result()

    def _fake_quant(self, layer: nn.Linear, act_absmax: Tensor, smoothing: Any) -> nn.Module:
        """The W8A8 fake-quant version of one (already smoothed) layer; its weight on the int8 grid with
        ``convert``."""
        explicit = smoothing.s if smoothing is not None and smoothing.explicit else None
        qmax = quant_range(self.act_bits)[1]
        static = act_absmax.max().clamp_min(1e-8) / qmax if self.act_granularity == "tensor" else None
        aq = SymmetricActQuantizer(self.act_bits, self.act_granularity, static, explicit)
        wq = WeightQuantizer(layer.weight, bits=self.bits, symmetric=True)
        new = FakeQuantLinear.from_module(layer, wq, aq)
        if self.convert:
            wq.convert(layer.weight)
        return new
