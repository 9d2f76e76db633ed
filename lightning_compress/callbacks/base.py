"""The base of the post-training callbacks: calibration at fit end, or one-shot through ``apply``."""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.calibration.batches import split_batch
from lightning_compress.nn.quantized import QuantizedLayer
from lightning_compress.nn.select import compile_patterns


class CalibrationCallback(pl.Callback, abc.ABC):
    """Base of the post-training callbacks: at fit end, :meth:`apply` on calibration batches; also one-shot.

    The batches are the first ``num_batches`` of ``calibration_data`` (any iterable of training batches; the
    Trainer's train dataloader when None), each turned into model inputs by ``input_fn`` (the inputs of
    :func:`~lightning_compress.calibration.batches.split_batch` when None). Under DDP every rank calibrates on its
    own shard and statistics are all-reduced.
    """

    def __init__(
        self,
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
    ) -> None:
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):  # fmt: skip
            raise ValueError(f"num_batches must be a positive int or None (all batches), got {num_batches!r}")
        compile_patterns(targets, "targets"), compile_patterns(ignore, "ignore")
        self.num_batches, self.calibration_data = num_batches, calibration_data
        self.input_fn = input_fn  # None: the inputs of split_batch (a lambda here could not be pickled for DDP)
        self.targets, self.ignore = targets, ignore
        self.quantized: dict[str, QuantizedLayer] = {}

    def calibration_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The model inputs to calibrate on, from ``calibration_data`` or the train dataloader."""
        source = self.calibration_data if self.calibration_data is not None else trainer.train_dataloader
        if source is None:
            raise RuntimeError(f"{type(self).__name__}: no calibration_data and the Trainer has no train dataloader")
        batches = itertools.islice(source, self.num_batches)
        return [self.input_fn(b) if self.input_fn else split_batch(b)[0] for b in batches]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, self.calibration_batches(trainer))

    @abc.abstractmethod
    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, QuantizedLayer]:
        """Quantize ``model`` in place on ``batches`` (model inputs: Tensor, tuple or dict); returns
        ``{name: QuantizedLayer}`` of the layers it quantized (also kept in :attr:`quantized`)."""
