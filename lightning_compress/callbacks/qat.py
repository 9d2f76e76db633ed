"""QATFakeQuant: quantization-aware training (linear int2..int8, LSQ, k-means weight sharing) as a callback."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_compress.budget import CompressionPlan, as_plan, exact_names
from lightning_compress.functional.checks import check_patterns
from lightning_compress.functional.quant import check_bits
from lightning_compress.nn.distributed import is_sharded
from lightning_compress.nn.fake_quant import (
    ActQuantizer,
    SymmetricActQuantizer,
    WeightQuantizer,
    check_weight_quant,
    fake_quant_class,
    is_fake_quant,
)
from lightning_compress.nn.observers import MovingAverageMinMaxObserver, MSEObserver, Observer, sync_observers
from lightning_compress.nn.quantized import QuantizedLayer
from lightning_compress.nn.select import replace_layers, select_layers

log = logging.getLogger(__name__)


class QATFakeQuant(pl.Callback):
    """Train with fake-quantized weights (and optionally activations); convert to the integer grid at fit end.

    In ``setup()`` every selected Linear / Conv becomes a fake-quant layer that reuses the same Parameter objects
    (optimizer state and weight keys are unchanged: checkpoints load into the plain model with ``strict=True``).
    Weights: symmetric per output channel by default, per group (``group_size``) or asymmetric, 2..8 bits,
    min-max scales or learned ones (``lsq=True``, Esser et al. 2020); or ``method="kmeans"``: ``2^bits`` shared
    centroids per layer (Han et al., Deep Compression), fine-tuned by the summed gradients of their members.
    Activations (``act_bits``): asymmetric per tensor, ranges from an observer (any
    :class:`~lightning_compress.nn.observers.Observer`: ``MinMaxObserver``, ``MovingAverageMinMaxObserver``,
    ``PercentileObserver``, ``MSEObserver``; one copy per layer) that can freeze after ``freeze_observers_step``
    optimizer steps; under DDP the ranges are all-reduced every step so all ranks agree. The backward pass is the
    straight-through estimator. With ``convert=True`` (default), fit end puts each weight exactly on its grid and
    keeps each layer's :class:`~lightning_compress.nn.quantized.QuantizedLayer` in :attr:`quantized`. Quantizer
    state (learned scales, codebooks, observer ranges, freeze state) is this callback's checkpoint state, so resume
    and ``Trainer.test(ckpt_path=...)`` restore it.

    From a PTQ start (``init_from=GPTQFinalize(...)`` or ``AWQCalibrate(...)``, the same bits, group size and symmetry):
    at fit start that one-shot algorithm quantizes the selected layers on the first ``num_batches`` training batches,
    and QAT begins on its result (its weights, its scales as the learned scales' starting point with ``lsq``, else
    frozen; its zero-points fixed), so the first step computes the PTQ model exactly and training refines the best
    one-shot grid instead of round-to-nearest (a resumed run restores the trained state instead). The layers are
    then the PTQ callback's selection (``targets`` / ``ignore`` of its own; a language model's output embeddings left
    out by default).

    Under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` applied in ``configure_model``) the swap
    happens first: Lightning runs callbacks' ``setup`` before ``configure_model``, so the fake-quant layers are the ones
    sharded (a layer already sharded is an error). Observer ranges are all-reduced as under DDP, conversion works on
    the whole (all-gathered) weights, and the saved quantizer state is whole and identical on every rank.

    YAML (``conf/compress/qat_int4.yaml``)::

        # @package _global_
        callbacks:
          qat:
            _target_: lightning_compress.QATFakeQuant
            bits: 4
            group_size: 32

    Python::

        trainer = L.Trainer(callbacks=[QATFakeQuant(bits=8, act_bits=8, observer=PercentileObserver(99.99))])
        trainer = L.Trainer(callbacks=[IterativePruning(method="nm"), QATFakeQuant(bits=8)])  # 2:4 + int8
        QATFakeQuant(bits=3, symmetric=False, lsq=True, init_from=GPTQFinalize(bits=3))  # QAT refines GPTQ

    Args:
        bits: weight code width, 2..8 (k-means: ``log2`` of the codebook size).
        symmetric: symmetric (zero-point 0) or asymmetric weights.
        group_size: one scale per ``group_size`` inputs of each row instead of one per row.
        method: ``"linear"``, ``"kmeans"`` or ``"fp8"`` (FP8 E4M3 weights, ``bits=8``, symmetric; with
            ``act_bits=8`` its activations are FP8 too, dynamic per token as FP8 kernels serve them).
        lsq: learn the weight scales (LSQ; linear only; asymmetric grids keep their zero-points fixed).
        kmeans_init: k-means initialisation, ``"linear"``, ``"kmeans++"`` or ``"density"``.
        scale_dtype: round min-max weight scales to ``"float16"`` / ``"bfloat16"`` as they are made (GGUF stores
            fp16 block scales: with it and ``group_size=32`` a GGUF file holds the trained grid exactly).
        act_bits: activation code width (2..8), or None for weight-only.
        observer: the activation observer: an :class:`Observer` (copied for every layer; in YAML a ``_target_``
            with its arguments) or a callable returning a new one. An ``MSEObserver`` must be built for
            ``bits=act_bits, symmetric=False``.
        freeze_observers_step: freeze activation ranges after this many optimizer steps (None: never).
        start_epoch: quantize from this epoch on (full precision before it, e.g. while pruning finishes).
        convert: put weights on their grid at fit end.
        init_from: a :class:`~lightning_compress.GPTQFinalize` or :class:`~lightning_compress.AWQCalibrate` whose
            result QAT starts from (see above); None starts from min-max round-to-nearest.
        targets, ignore: regexes over layer names (None with ``init_from``, whose own select the layers).
        plan: a compression plan (:class:`~lightning_compress.budget.CompressionPlan` or its YAML): fake-quantize
            exactly its layers whose option has bits, each at its option's bits, group size and symmetry (``bits``,
            ``group_size``, ``symmetric`` are then not used; ``targets``, ``ignore`` and ``init_from`` stay unset).
            Its N:M options are not QAT's: hold them with ``IterativePruning``.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        group_size: int | None = None,
        method: str = "linear",
        lsq: bool = False,
        kmeans_init: str = "linear",
        scale_dtype: str | None = None,
        act_bits: int | None = None,
        observer: Observer | Callable[[], Observer] = MovingAverageMinMaxObserver,
        freeze_observers_step: int | None = None,
        start_epoch: int = 0,
        convert: bool = True,
        init_from: Any = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        plan: str | Path | CompressionPlan | None = None,
    ) -> None:
        self.plan = None if plan is None else as_plan(plan)
        if self.plan is not None:
            if targets is not None or ignore is not None or init_from is not None:
                raise ValueError(f"plan= names the layers and grids; targets={targets!r}, ignore={ignore!r}, "
                                 f"init_from={init_from!r} must stay None")  # fmt: skip
            if not self.plan.quantized():
                raise ValueError(f"plan quantizes no layer (its options: {sorted(self.plan.counts())})")
        check_weight_quant(bits, symmetric, group_size, method, lsq, kmeans_init, scale_dtype)
        check_ptq_start(init_from, bits, group_size, symmetric, method, lsq, targets, ignore)
        check_patterns("targets", targets), check_patterns("ignore", ignore)
        self.bits = bits
        self.act_bits = None if act_bits is None else check_bits(act_bits, "act_bits")
        if method == "fp8" and act_bits not in (None, 8):
            raise ValueError(
                f"method='fp8' quantizes activations to FP8 (8 bits) or not at all, got act_bits={act_bits}"
            )
        self.observer = observer
        # activations with observed ranges (FP8's are dynamic per token: no observer)
        self.observed = act_bits is not None and method != "fp8"
        if self.observed:
            self.new_observer()  # validates the observer now
        if freeze_observers_step is not None and freeze_observers_step < 0:
            raise ValueError(f"freeze_observers_step must be >= 0 or None, got {freeze_observers_step}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.weight_kwargs = dict(bits=bits, symmetric=symmetric, group_size=group_size, method=method, lsq=lsq)
        self.weight_kwargs.update(kmeans_init=kmeans_init, scale_dtype=scale_dtype)
        self.freeze_observers_step, self.start_epoch, self.convert = freeze_observers_step, start_epoch, convert
        self.targets, self.ignore, self.init_from = targets, ignore, init_from
        self.layers: dict[str, nn.Module] = {}
        self.restored = False  # the quantizer state came from a checkpoint (no PTQ start then)
        self.quantized: dict[str, QuantizedLayer] = {}
        self.step = 0
        self.converted = False
        self._pending_state: dict[str, Any] | None = None

    def new_observer(self) -> Observer:
        """A fresh observer for one layer (a copy of ``observer``, or what calling it returns).

        Raises:
            TypeError: ``observer`` gives something that is not an Observer. ValueError: an ``MSEObserver`` built
                for other bits than ``act_bits`` or symmetric (QAT's activations are asymmetric).
        """
        made = copy.deepcopy(self.observer) if isinstance(self.observer, Observer) else None
        if made is None and callable(self.observer):
            made = self.observer()
        if not isinstance(made, Observer):
            raise TypeError(
                f"observer={self.observer!r} is not an Observer; allowed: an Observer instance or class "
                "(lightning_compress.nn.observers), or a callable returning one"
            )
        if isinstance(made, MSEObserver) and (made.bits, made.symmetric) != (self.act_bits, False):
            raise ValueError(
                f"observer=MSEObserver(bits={made.bits}, symmetric={made.symmetric}) does not match act_bits="
                f"{self.act_bits} with asymmetric activations; allowed: MSEObserver(bits={self.act_bits})"
            )
        return made

    @property
    def state_key(self) -> str:
        # the key still says "scheme" (the argument's old name) so checkpoints written before the rename resume
        return self._generate_state_key(bits=self.bits, scheme=self.weight_kwargs["method"], targets=self.targets)

    # ------------------------------------------------------------------------------------------- swap
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Swap the selected layers for fake-quant ones (all validated and built first; nothing half-done)."""
        if not self.layers:
            self._check_no_overlap(trainer, pl_module)
            self.layers = self.swap(pl_module)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)

    def _check_no_overlap(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Raise ValueError before any layer is swapped when another QATFakeQuant of this Trainer selects the same
        layers (each layer can be fake-quantized once)."""
        mine = set(self.select(model))
        for other in trainer.callbacks:
            if isinstance(other, QATFakeQuant) and other is not self:
                shared = mine & set(other.select(model))
                if shared:
                    raise ValueError(
                        f"two QATFakeQuant callbacks select the same layers {sorted(shared)[:5]}; allowed: one "
                        "QATFakeQuant per layer (give them disjoint targets / ignore)"
                    )

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers to fake-quantize: ``targets`` / ``ignore``, or the PTQ start's selection."""
        if self.init_from is not None:
            return self.init_from.select(model)
        if self.plan is not None:
            wanted = self.plan.quantized()
            layers = select_layers(model, exact_names(wanted), None)
            if len(layers) != len(wanted):
                raise ValueError(f"plan names layers this model lacks: {sorted(set(wanted) - set(layers))}")
            return layers
        return select_layers(model, self.targets, self.ignore)

    def weight_options(self, name: str) -> dict[str, Any]:
        """The :class:`~lightning_compress.nn.fake_quant.WeightQuantizer` arguments of layer ``name``: the plan
        option's bits, group size and symmetry, or the callback's."""
        if self.plan is None:
            return self.weight_kwargs
        option = self.plan.option(name)
        return {**self.weight_kwargs, "bits": option.bits, "group_size": option.group_size,
                "symmetric": option.symmetric}  # fmt: skip

    def swap(self, model: nn.Module) -> dict[str, nn.Module]:
        """Replace the selected layers of ``model`` in place; returns ``{name: fake-quant layer}``."""
        chosen = self.select(model)
        built = {}
        for name, layer in chosen.items():
            if is_fake_quant(layer):
                raise ValueError(f"layer {name!r} is already fake-quantized (two QATFakeQuant callbacks?)")
            if not layer.weight.is_floating_point():
                raise TypeError(f"layer {name!r} has a {layer.weight.dtype} weight; allowed: float layers")
            if is_sharded(layer.weight):
                raise ValueError(
                    f"layer {name!r} is already sharded (its weight is a DTensor); QATFakeQuant swaps layers in "
                    "setup(), before the strategy shards the model; allowed: a model sharded after setup (apply "
                    "fully_shard in the LightningModule's configure_model, not in __init__)"
                )
            try:
                wq = WeightQuantizer(layer.weight, **self.weight_options(name))
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
            aq = None
            if self.weight_kwargs["method"] == "fp8" and self.act_bits is not None:  # what FP8 kernels serve
                aq = SymmetricActQuantizer(self.act_bits, "token", method="fp8")
            elif self.act_bits is not None:
                aq = ActQuantizer(self.new_observer(), self.act_bits)
            built[name] = fake_quant_class(layer).from_module(layer, wq, aq)
            built[name].enabled = self.start_epoch == 0
        replace_layers(model, built)
        bits = sorted({self.weight_options(n)["bits"] for n in built})
        log.info("QATFakeQuant: %d layers fake-quantized at %s bits", len(built), "/".join(map(str, bits)))
        return built

    # ------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.init_from is not None and not self.restored:
            self.start_from_ptq(pl_module, self.init_from.calibration_batches(trainer))

    @torch.no_grad()
    def start_from_ptq(self, model: nn.Module, batches: Any) -> dict[str, QuantizedLayer]:
        """Run ``init_from`` on ``model``'s swapped layers (put back to plain layers for it, the same Parameters) and
        start every quantizer from its result; returns the PTQ result ``{name: QuantizedLayer}``. If the PTQ run
        fails, the model's weights and the fake-quant layers are as they were."""
        replace_layers(model, {name: layer.to_module() for name, layer in self.layers.items()})
        try:
            results = self.init_from.apply(model, batches)
        finally:
            replace_layers(model, self.layers)  # the QAT layers, whose Parameters the PTQ run wrote in place
        for name, layer in self.layers.items():
            layer.weight_quantizer.start_from(results[name].weight)
        log.info("QATFakeQuant: %d layers start from %s's grid", len(results), type(self.init_from).__name__)
        return results

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in self.layers.values():
            layer.enabled = self.converted or trainer.current_epoch >= self.start_epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.step += 1
        if not self.observed:
            return
        if trainer.world_size > 1:
            sync_observers([layer.act_quantizer.observer for layer in self.layers.values()])
        if self.freeze_observers_step is not None and self.step >= self.freeze_observers_step:
            for layer in self.layers.values():
                layer.act_quantizer.observer.freeze()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.convert:
            with _whole_parameters(trainer):
                self.convert_layers()

    @torch.no_grad()
    def convert_layers(self) -> dict[str, QuantizedLayer]:
        """Put every weight exactly on its grid, freeze scales and observers; returns (and keeps) the layers' codes,
        scales and activation ranges."""
        for name, layer in self.layers.items():  # check everything before changing anything
            if self.observed and int(layer.act_quantizer.observer.num_batches) == 0:
                raise RuntimeError(
                    f"layer {name!r}: the activation observer has seen no data; run at least one training or "
                    "calibration batch before converting"
                )
        for name, layer in self.layers.items():
            layer.enabled = True
            weight = layer.weight_quantizer.convert(layer.weight)
            act = None
            if self.observed:
                layer.act_quantizer.observer.freeze()
            if layer.act_quantizer is not None:
                act = layer.act_quantizer.quantized()
            self.quantized[name] = QuantizedLayer(weight, act)  # the codes convert made, not quantized a second time
        self.converted = True
        return self.quantized

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for name, layer in self.layers.items():
            entry = {"weight": layer.weight_quantizer.quant_state()}
            if self.observed:
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
            if "act" in entry and self.observed:
                layer.act_quantizer.observer.load_observer_state(entry["act"])
        self.step, self.converted = int(state["step"]), bool(state["converted"])
        self.restored = True
        if self.converted:
            for layer in self.layers.values():
                layer.enabled = True
        self._pending_state = None


def _whole_parameters(trainer: pl.Trainer) -> contextlib.AbstractContextManager[Any]:
    """Under ``FSDPStrategy`` (FSDP1, whose parameters are flattened shards between steps) a context in which every
    parameter is whole and changes are written back to the shards (``summon_full_params``); else a no-op (FSDP2's
    DTensor weights are converted whole by the quantizer itself)."""
    if isinstance(trainer.strategy, FSDPStrategy) and trainer.strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=True)
    return contextlib.nullcontext()


def check_ptq_start(
    init_from: Any,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    method: str,
    lsq: bool,
    targets: Any,
    ignore: Any,
) -> None:
    """Raise TypeError / ValueError unless ``init_from`` (None, or a PTQ callback) can start this QAT grid."""
    if init_from is None:
        return
    from lightning_compress.callbacks.awq import AWQCalibrate
    from lightning_compress.callbacks.gptq import GPTQFinalize

    if not isinstance(init_from, (GPTQFinalize, AWQCalibrate)):
        raise TypeError(
            f"init_from={type(init_from).__name__} cannot start QAT; allowed: None, GPTQFinalize or AWQCalibrate"
        )
    if isinstance(init_from, AWQCalibrate) and not init_from.quantize:
        raise ValueError("init_from=AWQCalibrate(quantize=False) leaves float weights; allowed: quantize=True")
    o = init_from.options
    if method != "linear" or o.method != "linear":
        raise ValueError(f"init_from needs integer grids: method='linear' here and there, got {method!r}, {o.method!r}")
    if (o.bits, o.group_size, o.symmetric) != (bits, group_size, symmetric):
        raise ValueError(
            f"init_from={type(init_from).__name__}(bits={o.bits}, group_size={o.group_size}, symmetric={o.symmetric}) "
            f"differs from QATFakeQuant(bits={bits}, group_size={group_size}, symmetric={symmetric}); allowed: the "
            "same grid in both (QAT starts from the PTQ codes and scales)"
        )
    if lsq and o.group_size is not None and o.act_order and not o.static_groups:
        raise ValueError(
            "init_from=GPTQFinalize(act_order=True, static_groups=False) gives one scale per column, which LSQ cannot "
            "learn; allowed: static_groups=True (the default) or act_order=False"
        )
    if targets is not None or ignore is not None:
        raise ValueError(
            f"targets={targets!r}, ignore={ignore!r} with init_from: the layers are the PTQ callback's selection; "
            "allowed: targets=None and ignore=None here (set them on init_from)"
        )
