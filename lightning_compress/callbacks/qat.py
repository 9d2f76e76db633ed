"""QATFakeQuant: quantization-aware training (linear int2..int8, LSQ, k-means weight sharing) as a callback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_compress.functional.quant import check_bits
from lightning_compress.nn.fake_quant import (
    ActQuantizer,
    WeightQuantizer,
    check_weight_quant,
    fake_quant_class,
    is_fake_quant,
)
from lightning_compress.nn.observers import make_observer
from lightning_compress.nn.select import replace_layers, select_layers

log = logging.getLogger(__name__)

_REDUCE = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}


class QATFakeQuant(pl.Callback):
    """Train with fake-quantized weights (and optionally activations); convert to the integer grid at fit end.

    In ``setup()`` every selected Linear / Conv becomes a fake-quant layer that reuses the same Parameter objects
    (optimizer state and weight keys are unchanged: checkpoints load into the plain model with ``strict=True``).
    Weights: symmetric per output channel by default, per group (``group_size``) or asymmetric, 2..8 bits,
    min-max scales or learned ones (``lsq=True``, Esser et al. 2020); or ``scheme="kmeans"``: ``2^bits`` shared
    centroids per layer (Han et al., Deep Compression), fine-tuned by the summed gradients of their members.
    Activations (``act_bits``): asymmetric per tensor, ranges from an observer (``"minmax"``, ``"ema"``,
    ``"percentile"``, ``"mse"``) that can freeze after ``freeze_observers_step`` optimizer steps; under DDP the
    ranges are all-reduced every step so all ranks agree. The backward pass is the straight-through estimator.
    With ``convert=True`` (default), fit end puts each weight exactly on its grid and keeps the integer codes,
    scales and zero-points in :attr:`exported`. Quantizer state (learned scales, codebooks, observer ranges, freeze
    state) is this callback's checkpoint state, so resume and ``Trainer.test(ckpt_path=...)`` restore it.

    YAML (``conf/compress/qat_int4.yaml``)::

        # @package _global_
        callbacks:
          qat:
            _target_: lightning_compress.QATFakeQuant
            bits: 4
            group_size: 32

    Python::

        trainer = L.Trainer(callbacks=[QATFakeQuant(bits=8, act_bits=8, observer="ema")])
        trainer = L.Trainer(callbacks=[IterativePruning(method="nm"), QATFakeQuant(bits=8)])  # 2:4 + int8

    Args:
        bits: weight code width, 2..8 (k-means: ``log2`` of the codebook size).
        symmetric: symmetric (zero-point 0) or asymmetric weights.
        group_size: one scale per ``group_size`` inputs of each row instead of one per row.
        scheme: ``"linear"`` or ``"kmeans"``.
        lsq: learn the weight scales (LSQ); symmetric linear only.
        kmeans_init: k-means initialisation, ``"linear"``, ``"kmeans++"`` or ``"density"``.
        act_bits: activation code width (2..8), or None for weight-only.
        observer: activation observer name.
        observer_kwargs: extra arguments of the observer.
        freeze_observers_step: freeze activation ranges after this many optimizer steps (None: never).
        start_epoch: quantize from this epoch on (full precision before it, e.g. while pruning finishes).
        convert: put weights on their grid at fit end.
        targets, ignore: regexes over layer names.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        group_size: int | None = None,
        scheme: str = "linear",
        lsq: bool = False,
        kmeans_init: str = "linear",
        act_bits: int | None = None,
        observer: str = "ema",
        observer_kwargs: dict[str, Any] | None = None,
        freeze_observers_step: int | None = None,
        start_epoch: int = 0,
        convert: bool = True,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
    ) -> None:
        check_weight_quant(bits, symmetric, group_size, scheme, lsq, kmeans_init)
        self.bits = bits
        self.act_bits = None if act_bits is None else check_bits(act_bits, "act_bits")
        self.observer_kwargs = dict(observer_kwargs or {})
        if act_bits is not None:
            make_observer(observer, **self._observer_args(observer))  # validates the name and arguments now
        if freeze_observers_step is not None and freeze_observers_step < 0:
            raise ValueError(f"freeze_observers_step must be >= 0 or None, got {freeze_observers_step}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.weight_kwargs = dict(bits=bits, symmetric=symmetric, group_size=group_size, scheme=scheme, lsq=lsq)
        self.weight_kwargs["kmeans_init"] = kmeans_init
        self.observer = observer
        self.freeze_observers_step, self.start_epoch, self.convert = freeze_observers_step, start_epoch, convert
        self.targets, self.ignore = targets, ignore
        self.layers: dict[str, nn.Module] = {}
        self.exported: dict[str, dict[str, Tensor]] = {}
        self.step = 0
        self.converted = False
        self._pending_state: dict[str, Any] | None = None

    def _observer_args(self, name: str) -> dict[str, Any]:
        extra = {"bits": self.act_bits, "symmetric": False} if name == "mse" else {}
        return {**extra, **self.observer_kwargs}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.bits, scheme=self.weight_kwargs["scheme"], targets=self.targets)

    # ------------------------------------------------------------------------------------------- swap
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Swap the selected layers for fake-quant ones (all validated and built first; nothing half-done)."""
        if not self.layers:
            self.layers = self.swap(pl_module)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)

    def swap(self, model: nn.Module) -> dict[str, nn.Module]:
        """Replace the selected layers of ``model`` in place; returns ``{name: fake-quant layer}``."""
        chosen = select_layers(model, self.targets, self.ignore)
        built = {}
        for name, layer in chosen.items():
            if is_fake_quant(layer):
                raise ValueError(f"layer {name!r} is already fake-quantized (two QATFakeQuant callbacks?)")
            if not layer.weight.is_floating_point():
                raise TypeError(f"layer {name!r} has a {layer.weight.dtype} weight; allowed: float layers")
            try:
                wq = WeightQuantizer(layer.weight, **self.weight_kwargs)
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
            aq = None
            if self.act_bits is not None:
                aq = ActQuantizer(make_observer(self.observer, **self._observer_args(self.observer)), self.act_bits)
            built[name] = fake_quant_class(layer).from_module(layer, wq, aq)
            built[name].enabled = self.start_epoch == 0
        replace_layers(model, built)
        log.info("QATFakeQuant: %d layers fake-quantized at %d bits", len(built), self.bits)
        return built

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in self.layers.values():
            layer.enabled = self.converted or trainer.current_epoch >= self.start_epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.step += 1
        if self.act_bits is None:
            return
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self.sync_observers()
        if self.freeze_observers_step is not None and self.step >= self.freeze_observers_step:
            for layer in self.layers.values():
                layer.act_quantizer.observer.freeze()

    @torch.no_grad()
    def sync_observers(self) -> None:
        """All-reduce every observer statistic by its declared op (one collective per op for all layers)."""
        by_op: dict[str, list[tuple[Any, str]]] = {}
        for layer in self.layers.values():
            obs = layer.act_quantizer.observer
            for attr, op in obs.reduce_ops().items():
                by_op.setdefault(op, []).append((obs, attr))
        for op, entries in by_op.items():
            flat = torch.stack([getattr(o, a).detach().float().reshape(()) for o, a in entries])
            dist.all_reduce(flat, op=_REDUCE[op])
            if op == "mean":
                flat /= dist.get_world_size()
            for (obs, attr), value in zip(entries, flat, strict=True):
                getattr(obs, attr).copy_(value)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.convert:
            self.convert_layers()

    @torch.no_grad()
    def convert_layers(self) -> dict[str, dict[str, Tensor]]:
        """Put every weight exactly on its grid, freeze scales and observers; returns (and keeps) the int tensors."""
        for name, layer in self.layers.items():  # check everything before changing anything
            if layer.act_quantizer is not None and int(layer.act_quantizer.observer.num_batches) == 0:
                raise RuntimeError(
                    f"layer {name!r}: the activation observer has seen no data; run at least one training or "
                    "calibration batch before converting"
                )
        for name, layer in self.layers.items():
            layer.enabled = True
            self.exported[name] = layer.weight_quantizer.convert(layer.weight)
            if layer.act_quantizer is not None:
                obs = layer.act_quantizer.observer
                obs.freeze()
                scale, zero_point = obs.qparams(self.act_bits, symmetric=False)
                self.exported[name].update(act_scale=scale, act_zero_point=zero_point)
        self.converted = True
        return self.exported

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for name, layer in self.layers.items():
            entry = {"weight": layer.weight_quantizer.quant_state()}
            if layer.act_quantizer is not None:
                entry["act"] = layer.act_quantizer.observer.observer_state()
            layers[name] = entry
        return {"layers": layers, "step": self.step, "converted": self.converted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict
        if self.layers:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state["layers"]) - set(self.layers))
        if unknown:
            raise ValueError(f"checkpoint has QAT state for layers {unknown} that this model does not select")
        for name, entry in state["layers"].items():
            layer = self.layers[name]
            layer.weight_quantizer.load_quant_state(entry["weight"])
            if "act" in entry and layer.act_quantizer is not None:
                layer.act_quantizer.observer.load_observer_state(entry["act"])
        self.step, self.converted = int(state["step"]), bool(state["converted"])
        if self.converted:
            for layer in self.layers.values():
                layer.enabled = True
        self._pending_state = None
