"""Fake-quantized Linear / Conv layers for quantization-aware training.

``FakeQuantLinear.from_module(linear, ...)`` returns a module of the same class family that **reuses the same
Parameter objects** (optimizer state and state-dict keys are unchanged) and fake-quantizes its weight (and
optionally its input) in ``forward``. The quantizers keep their own state (learned scales, codebooks, observer
ranges) out of the model's ``state_dict``, so a checkpoint loads into the plain model with ``strict=True``; the
QAT callback saves that state itself. ``to_module()`` gives the plain layer back, again with the same Parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.functional.checks import check_choice, check_positive_int
from lightning_compress.functional.fused import (
    fused_lsq_fake_quantize,
    minmax_fake_quantize,
    observe_fake_quantize,
    observe_fake_quantize_input_and_weight,
)
from lightning_compress.functional.kmeans import kmeans_1d
from lightning_compress.functional.quant import (
    QParams,
    check_bits,
    check_method,
    check_scale_dtype,
    compute_qparams,
    fake_quantize,
    group_shape,
    quantize,
    token_scale,
)
from lightning_compress.functional.size import TensorFormat
from lightning_compress.nn.distributed import full_tensor, local_like
from lightning_compress.nn.observers import Observer
from lightning_compress.nn.quantized import QuantizedInput, QuantizedLayer, QuantizedWeight
from lightning_compress.nn.select import retyped

METHODS = ("linear", "kmeans", "fp8")
KMEANS_INITS = ("linear", "kmeans++", "density")


def check_weight_quant(
    bits: int,
    symmetric: bool,
    group_size: int | None,
    method: str,
    lsq: bool,
    kmeans_init: str,
    scale_dtype: str | None = None,
) -> None:
    """Validate a weight-quantization configuration (shape-independent parts); raises ValueError / TypeError."""
    check_bits(bits)
    check_scale_dtype(scale_dtype)
    check_positive_int("group_size", group_size, optional=True)
    check_choice("method", method, METHODS)
    if method == "fp8":
        check_method(method, bits, symmetric)
    if lsq and method != "linear":
        raise ValueError(f"lsq=True needs method='linear' (LSQ learns the integer grid's step size), got {method!r}")
    if lsq and scale_dtype is not None:
        raise ValueError(f"scale_dtype={scale_dtype!r} rounds min-max scales; allowed with lsq=True: None")
    check_choice("kmeans_init", kmeans_init, KMEANS_INITS)


class _StatelessInStateDict(nn.Module):
    """A module whose parameters and buffers never enter (or are expected in) the parent's ``state_dict``."""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        return


class WeightQuantizer(_StatelessInStateDict):
    """Fake-quantizes a weight ``(out, in, ...)``.

    ``method="linear"``: signed ``bits``-bit codes, per output channel (``group_size=None``) or per group of
    ``group_size`` inputs, symmetric or asymmetric; min-max scales recomputed from the weight at every step, or
    learned (``lsq=True``, initialised from min-max; asymmetric grids keep their min-max zero-points fixed, or a PTQ
    start's, :meth:`from_quantized`). ``method="kmeans"``: ``2^bits`` shared centroids
    (Han et al., Deep Compression); each weight is an index into the codebook, zeros (pruned weights) stay zero,
    and each centroid's gradient is the sum of its members' gradients. After :meth:`convert` the scales are frozen
    and the weight sits exactly on its grid. ``method="fp8"``: FP8 E4M3 values (``bits=8``, symmetric) with min-max
    scales ``max|w| / 448`` per channel or group. ``scale_dtype="float16"`` rounds min-max scales to fp16 as they
    are made (a format that stores fp16 scales, GGUF's blocks, then holds the grid exactly).
    """

    def __init__(
        self,
        weight: Tensor,
        bits: int = 8,
        symmetric: bool = True,
        group_size: int | None = None,
        method: str = "linear",
        lsq: bool = False,
        kmeans_init: str = "linear",
        scale_dtype: str | None = None,
    ) -> None:
        super().__init__()
        check_weight_quant(bits, symmetric, group_size, method, lsq, kmeans_init, scale_dtype)
        group_shape(weight.shape, None if group_size else 0, group_size)  # validates group_size against the shape
        self.bits, self.symmetric, self.group_size = bits, symmetric, group_size
        self.method, self.lsq, self.kmeans_init, self.scale_dtype = method, lsq, kmeans_init, scale_dtype
        self.frozen: QParams | None = None
        self.scale: nn.Parameter | None = None
        self.register_buffer("zero", None, persistent=False)  # LSQ, asymmetric: the fixed integer zero-points
        if lsq:
            start = self._minmax(weight)
            self.scale = nn.Parameter(start.scale)
            self.zero = None if symmetric else start.zero_point
        # k-means: the codebook exists from the start so the optimizer sees it; cluster() fills it in place
        self.centroids = nn.Parameter(torch.zeros(2**bits, device=weight.device)) if method == "kmeans" else None
        self.clustered = False
        self.register_buffer("indices", None, persistent=False)
        self.register_buffer("nonzero", None, persistent=False)
        # bool of the weight's shape, True where it was exactly zero before it was put on the grid: pruned, as
        # opposed to the weights that round to code 0 (set by convert / from_quantized; None before)
        self.register_buffer("pruned", None, persistent=False)

    @property
    def grid(self) -> str:
        """The grid the weight is rounded onto: ``"fp8"`` or ``"linear"`` (integers; k-means has its codebook)."""
        return "fp8" if self.method == "fp8" else "linear"

    def _minmax(self, weight: Tensor) -> QParams:
        axis, group = None if self.group_size else 0, self.group_size
        return compute_qparams(
            weight.detach(), self.bits, self.symmetric, axis, group, False, self.grid, self.scale_dtype
        )

    def qparams(self, weight: Tensor) -> QParams:
        """The scale and zero-point in use for ``weight`` (frozen, learned, or min-max of the current weight)."""
        if self.frozen is not None:
            return self.frozen
        if self.scale is not None:
            scale = self.scale.detach().abs()
            return QParams(scale, torch.zeros_like(scale) if self.zero is None else self.zero)
        return self._minmax(weight)

    @torch.no_grad()
    def cluster(self, weight: Tensor) -> None:
        """K-means: fit ``2^bits`` centroids to the non-zero weights and assign every weight to one."""
        self.nonzero = weight != 0
        values = weight.detach()[self.nonzero].float()
        if values.numel() == 0:
            raise ValueError("k-means needs at least one non-zero weight; the layer is entirely pruned")
        centroids, idx = kmeans_1d(values, 2**self.bits, init=self.kmeans_init)
        indices = torch.zeros(weight.shape, dtype=torch.long, device=weight.device)
        indices[self.nonzero] = idx.to(weight.device)
        self.indices = indices
        self.centroids.copy_(centroids)
        self.clustered = True

    def fused_arguments(self) -> tuple[Any, ...] | None:
        """``(bits, symmetric, group_size)`` of the fused kernel
        (:func:`~lightning_compress.functional.fused.minmax_fake_quantize`) when this quantizer computes min-max scales
        of the current weight; None otherwise (k-means, LSQ, frozen)."""
        if self.method != "linear" or self.scale is not None or self.frozen is not None or self.scale_dtype:
            return None
        return self.bits, self.symmetric, self.group_size

    def forward(self, weight: Tensor) -> Tensor:
        if self.method == "kmeans":
            if not self.clustered:
                self.cluster(weight)
            return (self.centroids[self.indices] * self.nonzero).to(weight.dtype)
        if self.scale is not None and self.frozen is None:
            return fused_lsq_fake_quantize(weight, self.scale.abs(), self.bits, self.zero)
        if (fused := self.fused_arguments()) is not None:  # min-max and fake-quantize in one kernel
            return minmax_fake_quantize(weight, *fused)
        s, z = self.qparams(weight)
        return fake_quantize(weight, s, None if self.symmetric else z, self.bits, self.grid)

    @torch.no_grad()
    def quantized(self, weight: Tensor) -> QuantizedWeight:
        """``weight`` on this quantizer's grid as a :class:`QuantizedWeight` (the weight itself is not changed).

        Linear: int8 codes with the scale and zero-point in use; k-means: codebook indices, the codebook, and the
        mask of the non-zero weights.
        """
        if self.method == "kmeans":
            if not self.clustered:
                self.cluster(weight)
            codebook = self.centroids.detach().clone()
            return QuantizedWeight(
                self.indices.clone(), None, None, self.bits, None, "codebook", codebook, self.nonzero
            )
        s, z = self.qparams(weight)
        codes = quantize(weight.detach().float(), s, z, self.bits, self.grid)
        zero, fmt = None if self.symmetric else z.clone(), "fp8" if self.method == "fp8" else "int"
        return QuantizedWeight(codes, s.clone(), zero, self.bits, self.group_size, fmt)

    @torch.no_grad()
    def convert(self, weight: nn.Parameter) -> QuantizedWeight:
        """Put ``weight`` exactly on its grid (in place) and freeze the quantization parameters.

        A sharded (FSDP2) weight is converted whole, all-gathered on every rank (call it on every rank), and each
        rank keeps its shard of the result; the returned codes and scales are whole, identical on every rank.

        Returns:
            The :class:`QuantizedWeight`; its ``dequantize()`` equals the new (whole) weight.
        """
        whole = full_tensor(weight.detach())
        quantized = self.quantized(whole)
        self.pruned = whole == 0
        weight.copy_(local_like(quantized.dequantize().to(weight.dtype), weight))
        if self.method != "kmeans":
            zero = quantized.zero_point if quantized.zero_point is not None else torch.zeros_like(quantized.scale)
            self.frozen = QParams(quantized.scale.clone(), zero.clone())
        return quantized

    @classmethod
    @torch.no_grad()
    def from_quantized(
        cls, weight: Tensor, quantized: QuantizedWeight, pruned: Tensor | None = None, lsq: bool = False
    ) -> WeightQuantizer:
        """A linear quantizer at ``quantized``'s grid (e.g. GPTQ's or AWQ's), for a weight already on that grid:
        frozen there, or (``lsq=True``) with those scales as LSQ's learned starting point and its zero-points fixed,
        so training refines the PTQ result (the first forward equals it exactly); ``pruned`` marks the weights that
        were zero before quantization (see :attr:`pruned`).

        Raises:
            ValueError: ``lsq=True`` for an FP8 grid or one whose scales do not have min-max's block shape (GPTQ's
                act-order groups without ``static_groups``).
        """
        method = "fp8" if quantized.format == "fp8" else "linear"
        quantizer = cls(weight, quantized.bits, quantized.symmetric, quantized.group_size, method, lsq=lsq)
        quantizer.start_from(quantized, weight.device)
        quantizer.pruned = None if pruned is None else pruned.to(device=weight.device, dtype=torch.bool)
        return quantizer

    @torch.no_grad()
    def start_from(self, quantized: QuantizedWeight, device: torch.device | None = None) -> None:
        """Take ``quantized``'s grid (a PTQ result of this quantizer's bits, group size and symmetry) in place: LSQ's
        learned scales start at its scales (the same Parameter, so an optimizer holding it keeps it) with its
        zero-points fixed; any other linear quantizer is frozen at it (its tensors moved to ``device``, or to the
        learned scales' device).

        Raises:
            ValueError: a grid of other bits / group size / symmetry, or (LSQ) scales not of min-max's block shape
                (GPTQ's act-order groups without ``static_groups``).
        """
        mine = (self.bits, self.group_size, self.symmetric, self.grid)
        theirs = (
            quantized.bits,
            quantized.group_size,
            quantized.symmetric,
            {"int": "linear"}.get(quantized.format, quantized.format),
        )
        if mine != theirs:
            raise ValueError(
                f"a grid of (bits, group_size, symmetric, format) = {theirs} cannot start this quantizer's {mine}"
            )
        device = device if device is not None else self.scale.device if self.scale is not None else None
        scale = quantized.scale.to(device)
        zero = torch.zeros_like(scale) if quantized.zero_point is None else quantized.zero_point.to(scale.device)
        if self.scale is None:
            self.frozen = QParams(scale, zero)
            return
        if self.scale.shape != scale.shape:
            raise ValueError(
                f"scales of shape {tuple(scale.shape)} cannot start LSQ, whose scales are {tuple(self.scale.shape)} "
                "(one per channel or per group); allowed: a PTQ grid of contiguous groups "
                "(GPTQFinalize(static_groups=True), the default, or act_order=False)"
            )
        self.scale.copy_(scale.to(self.scale.device))
        self.zero = None if quantized.symmetric else zero.to(self.scale.device).clone()

    def quant_state(self) -> dict[str, Any]:
        """Everything needed to resume: learned scales, codebook, frozen parameters."""
        state: dict[str, Any] = {"frozen": None if self.frozen is None else tuple(t.cpu() for t in self.frozen)}
        if self.scale is not None:  # whole (a sharded learned scale is all-gathered), as every tensor here
            state["scale"] = full_tensor(self.scale.detach()).cpu()
        if self.zero is not None:
            state["zero"] = self.zero.cpu()
        if self.clustered:
            centroids = full_tensor(self.centroids.detach()).cpu()
            state.update(centroids=centroids, indices=self.indices.cpu(), nonzero=self.nonzero.cpu())
        if self.pruned is not None:
            state["pruned"] = self.pruned.cpu()
        return state

    @torch.no_grad()
    def load_quant_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`quant_state` (Parameters are updated in place so optimizer references stay valid)."""
        device = self.scale.device if self.scale is not None else None
        if state.get("frozen") is not None:
            self.frozen = QParams(*(t.to(device) if device else t for t in state["frozen"]))
        if "scale" in state and self.scale is not None:
            self.scale.copy_(local_like(state["scale"].to(self.scale.device), self.scale))
        if "zero" in state:
            self.zero = state["zero"].to(device)
        if "centroids" in state:
            self.centroids.copy_(local_like(state["centroids"].to(self.centroids.device), self.centroids))
            self.indices, self.nonzero = state["indices"].clone(), state["nonzero"].clone()
            self.clustered = True
        if state.get("pruned") is not None:
            self.pruned = state["pruned"].clone()


class ActQuantizer(_StatelessInStateDict):
    """Fake-quantizes activations asymmetric per-tensor with ranges from an :class:`Observer`.

    Until the observer has seen a batch (e.g. Lightning's sanity-check validation before training), inputs pass
    through unquantized.
    """

    def __init__(self, observer: Observer, bits: int = 8) -> None:
        super().__init__()
        self.bits = check_bits(bits, "act_bits")
        self.observer = observer

    def unquantized(self, x: Tensor) -> Tensor:
        """The input of a disabled layer: ``x`` as is."""
        return x

    def fused_arguments(self, x: Tensor) -> tuple[Any, ...] | None:
        """The observer arguments of the fused kernel
        (:func:`~lightning_compress.functional.fused.observe_fake_quantize`) when this forward would update a min / max
        or EMA observer; None otherwise."""
        obs = self.observer
        if not obs.updating or x.numel() == 0:
            return None
        fused, averaging_constant = obs.fused_update()
        return (obs.min_val, obs.max_val, obs.num_batches, self.bits, averaging_constant) if fused else None

    def forward(self, x: Tensor) -> Tensor:
        fused = self.fused_arguments(x)
        if fused is not None:  # observe and fake-quantize in one kernel
            return observe_fake_quantize(x, *fused)
        obs = self.observer
        x = obs(x)
        if int(obs.num_batches) == 0:
            return x
        s, z = obs.qparams(self.bits, symmetric=False)
        return fake_quantize(x, s.to(x.device), z.to(x.device), self.bits)

    def quantized(self) -> QuantizedInput | None:
        """The static asymmetric input quantization the observer's range gives, or None before it saw data."""
        if int(self.observer.num_batches) == 0:
            return None
        s, z = self.observer.qparams(self.bits, symmetric=False)
        return QuantizedInput(self.bits, s.reshape(()), z.reshape(()))


ACT_GRANULARITIES = ("tensor", "token")


class SymmetricActQuantizer(_StatelessInStateDict):
    """Symmetric fake quantization of activations ``(..., in)``, after an optional per-channel smoothing division.

    ``x -> x / smooth`` (SmoothQuant's explicit scale where nothing could absorb it), then codes in
    ``[-2^(b-1), 2^(b-1) - 1]`` with ``S = max|x| / (2^(b-1) - 1)`` either per token (the last dimension, computed at
    run time: dynamic) or one static per-tensor ``scale`` from calibration; ``method="fp8"``: E4M3 codes with
    ``S = max|x| / 448`` (8 bits). Disabled layers still divide by
    ``smooth`` (:meth:`unquantized`), so smoothing alone never changes a model's outputs.
    """

    def __init__(
        self,
        bits: int = 8,
        granularity: str = "token",
        scale: Tensor | None = None,
        smooth: Tensor | None = None,
        method: str = "linear",
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits, "act_bits")
        self.method = check_method(method, bits)
        if granularity not in ACT_GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is not supported; allowed: {list(ACT_GRANULARITIES)}")
        if granularity == "tensor" and (scale is None or scale.dim() != 0 or not scale > 0):
            raise ValueError(f"granularity='tensor' needs a positive 0-dim scale, got {scale!r}")
        self.granularity = granularity
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("smooth", smooth, persistent=False)

    def unquantized(self, x: Tensor) -> Tensor:
        """``x / smooth`` (``x`` itself without smoothing)."""
        return x if self.smooth is None else x / self.smooth.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.unquantized(x)
        if self.granularity == "tensor":
            return fake_quantize(x, self.scale, None, self.bits, self.method)
        return fake_quantize(x, token_scale(x, self.bits, self.method), None, self.bits, self.method)

    def quantized(self) -> QuantizedInput:
        """This quantizer as a :class:`QuantizedInput` (dynamic per token, or the static scale; the smoothing)."""
        scale = self.scale if self.granularity == "tensor" else None
        return QuantizedInput(self.bits, scale, None, self.smooth, self.method)

    def extra_repr(self) -> str:
        smooth, method = self.smooth is not None, self.method
        return f"bits={self.bits}, granularity={self.granularity!r}, smooth={smooth}, method={method!r}"


class _FakeQuantMixin:
    """Shared by the fake-quant layer classes: swap in / out, reusing the wrapped layer's Parameters."""

    weight_quantizer: WeightQuantizer
    act_quantizer: ActQuantizer | SymmetricActQuantizer | None
    _plain_class: type[nn.Module]
    enabled: bool

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        weight_quantizer: WeightQuantizer,
        act_quantizer: ActQuantizer | SymmetricActQuantizer | None = None,
    ) -> nn.Module:
        """A fake-quant version of ``module`` sharing its Parameter objects and attributes."""
        new = retyped(module, cls)
        object.__setattr__(new, "_plain_class", type(module))
        new.weight_quantizer = weight_quantizer
        new.act_quantizer = act_quantizer
        new.enabled = True
        return new

    def to_module(self) -> nn.Module:
        """The plain layer (its original class) with the same Parameters and no quantizers."""
        plain = retyped(self, self._plain_class)
        for name in ("weight_quantizer", "act_quantizer"):
            plain._modules.pop(name, None)
        for name in ("_plain_class", "enabled"):
            plain.__dict__.pop(name, None)
        return plain

    @property
    def weight_format(self) -> TensorFormat:
        """How the weight is stored once converted (for the compression summary's byte count)."""
        wq = self.weight_quantizer
        if wq.method == "kmeans":
            return TensorFormat(codebook_size=2**wq.bits)
        n_scales = self.weight.shape[0] * (self.weight[0].numel() // wq.group_size if wq.group_size else 1)
        return TensorFormat(bits=wq.bits, n_scales=n_scales, asymmetric=not wq.symmetric)

    def quantized(self) -> QuantizedLayer:
        """The layer's weight on its grid and its input quantization (None when it has none or it is inactive)."""
        act = self.act_quantizer.quantized() if self.act_quantizer is not None else None
        return QuantizedLayer(self.weight_quantizer.quantized(self.weight), act)

    def fake_quantized_weight(self) -> Tensor:
        """The weight as the forward pass uses it."""
        return self.weight_quantizer(self.weight) if self.enabled else self.weight

    def fake_quantized_operands(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(fake_quantized_input(x), fake_quantized_weight())``, as one fused call when both quantizers allow it."""
        aq = self.act_quantizer
        if self.enabled and isinstance(aq, ActQuantizer):
            act, weight = aq.fused_arguments(x), self.weight_quantizer.fused_arguments()
            if act is not None and weight is not None:
                return observe_fake_quantize_input_and_weight(x, *act, self.weight, *weight)
        return self.fake_quantized_input(x), self.fake_quantized_weight()

    def fake_quantized_input(self, x: Tensor) -> Tensor:
        """The input as the forward pass uses it (a disabled layer keeps an exact smoothing division)."""
        if self.act_quantizer is None:
            return x
        if self.enabled:
            return self.act_quantizer(x)
        return self.act_quantizer.unquantized(x)


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and (optionally) input. Shapes as ``nn.Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(*self.fake_quantized_operands(x), self.bias)


class _FakeQuantConv(_FakeQuantMixin):
    """The conv forward with fake-quantized weight and (optionally) input; shapes as the wrapped conv."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(*self.fake_quantized_operands(x), self.bias)


class FakeQuantConv1d(_FakeQuantConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and (optionally) input."""


class FakeQuantConv2d(_FakeQuantConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and (optionally) input."""


class FakeQuantConv3d(_FakeQuantConv, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight and (optionally) input."""


FAKE_QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: FakeQuantLinear,
    nn.Conv1d: FakeQuantConv1d,
    nn.Conv2d: FakeQuantConv2d,
    nn.Conv3d: FakeQuantConv3d,
}


def fake_quant_class(module: nn.Module) -> type[nn.Module]:
    """The fake-quant class for ``module`` (a Linear or Conv, subclasses included); TypeError otherwise."""
    for base, fq in FAKE_QUANT_CLASSES.items():
        if isinstance(module, base):
            return fq
    raise TypeError(f"{type(module).__name__} has no fake-quant version; allowed: Linear, Conv1d, Conv2d, Conv3d")


def is_fake_quant(module: nn.Module) -> bool:
    """Whether ``module`` is one of the fake-quant layers."""
    return isinstance(module, _FakeQuantMixin)
