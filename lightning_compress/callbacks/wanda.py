"""WandaPrune: one-shot Wanda pruning (weights × input norms) of a model's Linears, at fit end or through ``apply``."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_compress.calibration.wanda import wanda_model
from lightning_compress.callbacks.base import OneShotPruning, Swap


class WandaPrune(OneShotPruning):
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

    def prune(self, model: nn.Module, layers: dict[str, nn.Module], batches: list[Any], swap: Swap) -> None:
        """Wanda on the engine's block-by-block walk (:func:`~lightning_compress.calibration.wanda.wanda_model`)."""
        wanda_model(model, layers, batches, self.sparsity, self.nm, lambda masks: swap({}, masks))
