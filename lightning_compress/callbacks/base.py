"""The base of the post-training callbacks: calibration at fit end, or one-shot through ``apply``."""

from __future__ import annotations

import abc
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_compress.calibration.batches import LABEL_KEYS, call_model, check_tokens, describe, head, split_batch
from lightning_compress.calibration.capture import eval_mode
from lightning_compress.calibration.engine import active_stream
from lightning_compress.functional.checks import check_patterns
from lightning_compress.functional.masks import sparsity_or_pattern
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.quantized import QuantizedLayer
from lightning_compress.nn.select import replace_layers, replaced_on_error, restored_on_error, select_layers

log = logging.getLogger(__name__)


class Swap:
    """Replaces calibrated layers of ``model`` by their quantized twins as blocks finish, recording each layer's
    :class:`QuantizedLayer` in ``quantized`` and a pruner's keep-masks in ``masks`` (see
    :meth:`CalibrationCallback.swapping`)."""

    def __init__(
        self, model: nn.Module, quantized: dict[str, QuantizedLayer], masks: dict[str, Tensor] | None = None
    ) -> None:
        self.model, self.quantized, self.masks = model, quantized, masks
        self.names: list[str] = []
        self.masked: list[str] = []

    def __call__(
        self, built: Mapping[str, tuple[nn.Module, QuantizedLayer]], masks: Mapping[str, Tensor] | None = None
    ) -> None:
        """Put each ``{name: (module, QuantizedLayer)}`` in place and record ``masks`` (``{name: bool (out, in)}``)."""
        replace_layers(self.model, {name: module for name, (module, _) in built.items()})
        for name, (_, state) in built.items():
            self.quantized[name] = state
        self.names.extend(built)
        if masks:
            if self.masks is None:
                raise TypeError("this Swap records no masks (a quantizer's); masks come from a pruner's swapping()")
            self.masks.update(masks)
            self.masked.extend(masks)

    def result(self) -> dict[str, QuantizedLayer]:
        """``{name: QuantizedLayer}`` of the layers swapped and still recorded (a streamed run drops written
        blocks')."""
        return {name: self.quantized[name] for name in self.names if name in self.quantized}

    def mask_result(self) -> dict[str, Tensor]:
        """``{name: keep-mask}`` recorded and still kept (a streamed run drops written blocks')."""
        masks = self.masks or {}
        return {name: masks[name] for name in self.masked if name in masks}

    def forget(self) -> None:
        """Drop everything this swap recorded (the body failed)."""
        for name in self.names:
            self.quantized.pop(name, None)
        for name in self.masked:
            (self.masks or {}).pop(name, None)


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
        check_patterns("targets", targets), check_patterns("ignore", ignore)
        self.num_batches, self.calibration_data = num_batches, calibration_data
        self.input_fn = input_fn  # None: the inputs of split_batch (a lambda here could not be pickled for DDP)
        self.targets, self.ignore = targets, ignore
        self.quantized: dict[str, QuantizedLayer] = {}

    def calibration_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``num_batches`` batches of ``calibration_data`` or the train dataloader, as they are (:meth:`apply`
        turns them into model inputs); at fit start, before the fit loop has loaded it, the train dataloader is asked
        of the datamodule or the LightningModule that Lightning would ask."""
        source = self.calibration_data if self.calibration_data is not None else trainer.train_dataloader
        if source is None and trainer.fit_loop._data_source.is_defined():
            source = trainer.fit_loop._data_source.dataloader()
        if source is None:
            raise RuntimeError(f"{type(self).__name__}: no calibration_data and the Trainer has no train dataloader")
        return list(itertools.islice(source, self.num_batches))

    def _inputs(self, batch: Any) -> Any:
        return self.input_fn(batch) if self.input_fn is not None else split_batch(batch)[0]

    def model_inputs(self, model: nn.Module, batches: Any) -> list[Any]:
        """The model inputs of ``batches``, in the forms a LightningModule's dataloader yields them, checked once.

        ``batches`` is an iterable of batches (a list, a DataLoader) or one batch (a Tensor or a dict). Each batch
        goes through ``input_fn`` or, by default, the rule the callbacks use at fit end
        (:func:`~lightning_compress.calibration.batches.split_batch`): ``x`` of ``(x, y, ...)``, a dict without its
        labels, a Tensor as it is. The model runs on one sample of the first batch (eval mode, no gradients) so a
        batch it cannot take fails here, saying what was expected, before anything is changed.

        Raises:
            ValueError: no batches, no real token, or sequences beyond the model's context.
            TypeError: batches the model's forward cannot take.
        """
        if isinstance(batches, (Tensor, Mapping)):
            batches = [batches]
        if not isinstance(batches, Iterable) or isinstance(batches, str):
            raise TypeError(
                f"batches must be an iterable of batches or one Tensor / dict, got {type(batches).__name__}"
            )
        inputs = [self._inputs(b) for b in batches]
        if not inputs:
            raise ValueError(f"batches is empty; {type(self).__name__} needs at least one calibration batch")
        check_tokens(model, inputs)
        stream = active_stream()  # a streamed model runs up to its first block only (the rest is on disk)
        try:
            with eval_mode(model), torch.no_grad():
                (stream.check if stream is not None else call_model)(model, head(inputs[0], 1))
        except (TypeError, RuntimeError) as err:
            raise TypeError(
                f"{type(model).__name__}.forward cannot take the calibration batches ({describe(inputs[0])} after "
                f"dropping labels): {err}. Allowed: what the model's dataloader yields: x, (x, y, ...) tuples whose "
                f"first item is the input, or dicts of keyword inputs (labels under {sorted(LABEL_KEYS)} are dropped); "
                "or pass input_fn= to turn a batch into model inputs"
            ) from err
        return inputs

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, self.calibration_batches(trainer))

    @contextmanager
    def swapping(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[Swap]:
        """Within this context each finished block's layers may be swapped for their quantized twins
        (``swap({name: (module, QuantizedLayer)})``, recorded in :attr:`quantized`); if the body raises, every layer
        and weight of ``model`` is put back and the entries it recorded are dropped."""
        swap = Swap(model, self.quantized, getattr(self, "masks", None))
        try:
            with restored_on_error(model), replaced_on_error(model, layers):
                yield swap
        except BaseException:
            swap.forget()
            raise

    @abc.abstractmethod
    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, QuantizedLayer]:
        """Quantize ``model`` in place on ``batches`` (model inputs: Tensor, tuple or dict); returns
        ``{name: QuantizedLayer}`` of the layers it quantized (also kept in :attr:`quantized`)."""


def check_group_size(widths: Mapping[str, int], group_size: int | None) -> None:
    """Raise ValueError (naming the first layer) unless ``group_size`` divides every ``{layer name: input width}``."""
    for name, width in widths.items():
        if group_size is not None and width % group_size:
            raise ValueError(
                f"layer {name!r}: group_size={group_size} does not divide its input width {width}; allowed: "
                "a divisor of every selected layer's input width, or group_size=None (per channel)"
            )


class OneShotPruning(CalibrationCallback):
    """Base of the one-shot pruners of a model's Linears (Wanda, SparseGPT): ``sparsity`` or an ``"N:M"``
    ``pattern``, layer selection and checks, and an ``apply`` that restores every weight if the pruner fails midway.

    Subclasses implement :meth:`prune`. Args as for :class:`CalibrationCallback`, plus ``sparsity`` (the fraction
    removed, in ``[0, 1)``; None for 0.5; unset with a pattern) and ``pattern`` (``"N:M"`` along the inputs, or None).
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
        self.sparsity, self.nm = sparsity_or_pattern(sparsity, pattern)
        self.pattern = pattern
        self.masks: dict[str, Tensor] = {}

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The Linears to prune; raises before anything changes when one cannot be (a non-float weight, an input
        width that ``M`` does not divide)."""
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

    @abc.abstractmethod
    def prune(self, model: nn.Module, layers: dict[str, nn.Module], batches: list[Any], swap: Swap) -> None:
        """Prune ``layers`` of ``model`` in place on model-input ``batches``, handing each finished block's
        ``{name: bool keep-mask}`` (and any quantized twins) to ``swap``."""

    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:  # type: ignore[override]
        """Prune ``model``'s selected Linears in place on ``batches``; returns ``{name: bool keep-mask (out, in)}``
        (also kept in :attr:`masks`). An error midway restores every weight."""
        layers = self.select(model)
        batches = self.model_inputs(model, batches)
        with self.swapping(model, layers) as swap:
            self.prune(model, layers, batches, swap)
        masks = swap.mask_result()
        kept = sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
        log.info("%s: %d layers, %.1f%% of their weights pruned", type(self).__name__, len(masks), 100 * (1 - kept))
        return masks
