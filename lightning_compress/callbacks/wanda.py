"""WandaPrune: one-shot Wanda pruning (weights × input norms) of a model's Linears, at fit end or through ``apply``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_compress.calibration.wanda import wanda_model
from lightning_compress.callbacks.base import CalibrationCallback
from lightning_compress.functional.masks import check_sparsity, parse_nm
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.select import restored_on_error, select_layers

log = logging.getLogger(__name__)


class WandaPrune(CalibrationCallback):
    """Prune a model's Linears one-shot with Wanda (Sun et al. 2024): score ``|W_ij| · ‖X_j‖₂`` on calibration data,
    drop the lowest scores of every output row (or keep N of every M inputs), no weight update, no retraining.

    Block by block on the calibration engine: each transformer block is scored on the outputs of the already-pruned
    blocks before it. The pruned weights are exact zeros, so ``IterativePruning`` (the same sparsity or pattern) holds
    them through fine-tuning and ``export_for_inference`` stores a 2:4 result as 2:4 layers. A language model's
    output embeddings are left out by default (see :func:`~lightning_compress.nn.select.select_layers`).

    YAML (``conf/compress/wanda_24.yaml``)::

        callbacks:
          wanda:
            _target_: lightning_compress.WandaPrune
            pattern: "2:4"

    Python::

        WandaPrune(sparsity=0.5).apply(llm, calibration_batches)   # one-shot, 50% of every row
        trainer = L.Trainer(callbacks=[WandaPrune(pattern="2:4")])  # at the end of trainer.fit

    Args:
        sparsity: the fraction of each output row removed, in ``[0, 1)`` (unstructured); None for 0.5. With
            ``pattern`` it must stay unset (N:M fixes it).
        pattern: ``"N:M"`` (e.g. ``"2:4"``) for N:M sparsity along the inputs, or None for unstructured.
        num_batches, calibration_data, input_fn: calibration batches at fit end (see :class:`CalibrationCallback`).
        targets, ignore: regexes over Linear layer names.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str | None = None,
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Any = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_batches, calibration_data, input_fn, targets, ignore)
        self.nm = parse_nm(pattern) if pattern is not None else None
        fixed = None if self.nm is None else 1 - self.nm[0] / self.nm[1]
        if fixed is not None and sparsity is not None:
            raise ValueError(
                f"sparsity={sparsity!r} with pattern={pattern!r}: N:M fixes the sparsity at {fixed:g}; allowed: "
                "sparsity unset (None) with a pattern"
            )
        self.sparsity = fixed if fixed is not None else check_sparsity(0.5 if sparsity is None else sparsity)
        self.pattern = pattern
        self.masks: dict[str, Tensor] = {}

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The Linears Wanda will prune; raises ValueError before anything changes when one cannot be."""
        layers = select_layers(model, self.targets, self.ignore, kind="Linear",
                               accept=lambda m: isinstance(m, nn.Linear) and not is_fake_quant(m))  # fmt: skip
        for name, layer in layers.items():
            if not layer.weight.is_floating_point():
                raise TypeError(f"layer {name!r} has a {layer.weight.dtype} weight; allowed: float Linears")
            if self.nm is not None and layer.in_features % self.nm[1]:
                raise ValueError(
                    f"layer {name!r}: input width {layer.in_features} is not divisible by M={self.nm[1]} (pattern "
                    f"{self.pattern!r}); allowed: layers whose in_features is a multiple of M (name others in ignore)"
                )
        return layers

    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:  # type: ignore[override]
        """Prune ``model``'s selected Linears in place on ``batches``; returns ``{name: bool keep-mask (out, in)}``
        (also kept in :attr:`masks`). An error midway restores every weight."""
        layers = self.select(model)
        batches = self.model_inputs(model, batches)
        with restored_on_error(model):
            masks = wanda_model(model, layers, batches, self.sparsity, self.nm)
        self.masks.update(masks)
        kept = sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
        log.info("WandaPrune: %d layers, %.1f%% of their weights pruned", len(masks), 100 * (1 - kept))
        return masks
