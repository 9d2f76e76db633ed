"""The common shape of the inference layers that ``export_for_inference`` builds.

An exported layer persists only its compressed form (int8 / packed int4 codes, 2:4 values and positions, scales)
as buffers, so ``state_dict`` and the safetensors file hold exactly that. At run time it computes with one
*kernel*, chosen per device by the export's self-check (which times the candidates at the layer's real shape and
verifies each against :meth:`ExportedLinear.reference`): a fast path over core torch or oneDNN ops, a dense float
kernel over a dequantized cache (faster on some shapes, more memory), or the reference itself (dequantize, then an
ordinary matmul: slow and obviously right). A layer may hold a second kernel for inputs of at most
:data:`SMALL_ROWS` rows (LLM decoding, where a memory-bound int4 / int8 matmul beats the float one that wins at
prefill); the row count of each call picks between the two. :meth:`spec` is the JSON-able description the
manifest stores; :meth:`from_spec` rebuilds an empty layer of the same shapes for loading.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Kernels every exported layer has: the reference path, and a dense float matmul over a dequantized cache.
REFERENCE = "reference"
FLOAT = "float"
# Inputs of at most this many rows (tokens) run the layer's small-rows kernel when it has one: decoding a few
# sequences (a memory-bound int4 matmul beats bf16 at 1 row and loses from about 4-6 rows on at 576-1536 widths).
SMALL_ROWS = 4


class ExportedLayer(nn.Module, abc.ABC):
    """Base of the exported inference layers (Linear and Conv): ``in_features`` / ``out_features`` are the input and
    output widths (channels of a conv), any float input dtype.

    Subclasses declare ``KERNELS`` (all the names they know), ``CACHED_KERNELS`` (those holding a second,
    dense copy of the weight: never picked when the export prefers memory) and implement :meth:`spec`,
    :meth:`from_spec`, :meth:`dequantized_weight`, :meth:`reference`, :meth:`random_input`, :meth:`fits`,
    ``forward`` and :meth:`_prepare` for their fast kernels.
    """

    KERNELS: ClassVar[tuple[str, ...]] = (REFERENCE, FLOAT)
    CACHED_KERNELS: ClassVar[tuple[str, ...]] = (FLOAT,)

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = REFERENCE
        self.small_kernel: str | None = None  # the kernel for inputs of at most SMALL_ROWS rows (None: ``kernel``)
        self._caches: dict[str, Any] = {}  # run-time state of each kernel in use (non-persistent)
        self._casts: dict[torch.dtype, Tensor] = {}  # the float kernel's weight in each input dtype seen

    # ------------------------------------------------------------------------------ what subclasses provide
    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able description (shapes, bits, granularity): with the buffers, all :meth:`from_spec` needs."""

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: dict[str, Any]) -> ExportedLayer:
        """An instance with buffers of the right shapes and dtypes (contents undefined until a state dict loads)."""

    @abc.abstractmethod
    def dequantized_weight(self) -> Tensor:
        """The weight the layer represents, float32, shaped as the float layer's (``(out, in)`` for a Linear)."""

    @abc.abstractmethod
    def reference(self, x: Tensor) -> Tensor:
        """The slow, obviously-correct forward: quantize the input as the layer does, dequantize, the float op."""

    @abc.abstractmethod
    def random_input(self, rows: int, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
        """A random input on the layer's device, for timing and verifying kernels: of ``shape`` (an example input's
        shape) when given, else of ``rows`` rows (tokens; batch x positions for a conv)."""

    @abc.abstractmethod
    def fits(self, module: nn.Module) -> bool:
        """Whether ``module`` (the float layer in a freshly built model) has this layer's shapes."""

    def available_kernels(self) -> list[str]:
        """Kernels usable on the layer's current device (subclasses add their fast paths)."""
        return [REFERENCE, FLOAT]

    def float_input(self, x: Tensor) -> Tensor:
        """The input of the float kernel: ``x`` itself here; layers with static activation ranges clip it first."""
        return x

    def _prepare(self, kernel: str) -> Any:
        """Build the run-time cache ``kernel`` needs (None when it needs none)."""
        if kernel == FLOAT:
            return self.dequantized_weight()
        return None

    # ------------------------------------------------------------------------------ shared machinery
    def bias_or_none(self) -> Tensor | None:
        """The bias buffer, or None when the layer has none."""
        return getattr(self, "bias", None)

    def set_kernel(self, kernel: str, small_kernel: str | None = None) -> None:
        """Compute with ``kernel`` from now on, and with ``small_kernel`` on inputs of at most :data:`SMALL_ROWS`
        rows (None: ``kernel`` for all); builds their caches. ValueError if unknown or unavailable here."""
        available = self.available_kernels()
        for name, value in (("kernel", kernel), ("small_kernel", small_kernel)):
            if value is None and name == "small_kernel":
                continue
            if value not in self.KERNELS:
                raise ValueError(
                    f"{name}={value!r} is not a kernel of {type(self).__name__}; allowed: {list(self.KERNELS)}"
                )
            if value not in available:
                raise ValueError(f"{name}={value!r} is not available for {self.extra_repr()}; available: {available}")
        self.kernel, self.small_kernel = kernel, None if small_kernel == kernel else small_kernel
        self._rebuild_caches()

    def _rebuild_caches(self) -> None:
        """Drop every cache and build those of :attr:`kernel` and :attr:`small_kernel` from the buffers."""
        self._caches, self._casts = {}, {}
        for kernel in dict.fromkeys(k for k in (self.kernel, self.small_kernel) if k is not None):
            self._caches[kernel] = self._prepare(kernel)

    @property
    def _cache(self) -> Any:
        """The cache of :attr:`kernel`."""
        return self._caches.get(self.kernel)

    def kernel_for(self, rows: int) -> str:
        """The kernel an input of ``rows`` rows runs: :attr:`small_kernel` up to :data:`SMALL_ROWS`, else
        :attr:`kernel`."""
        return self.small_kernel if self.small_kernel is not None and rows <= SMALL_ROWS else self.kernel

    def float_weight(self, dtype: torch.dtype) -> Tensor:
        """The float kernel's weight in ``dtype``, cast once per dtype from the float32 master (never from another
        cast)."""
        w = self._casts.get(dtype)
        if w is None:
            w = self._casts[dtype] = self._caches[FLOAT].to(dtype)
        return w

    def _apply(self, fn: Any, recurse: bool = True) -> ExportedLayer:
        # Moves follow the device only: codes and scales keep their dtypes (``model.to(torch.bfloat16)`` must not
        # round the float32 scales); the compute dtype follows the input. Caches are rebuilt on the new device.
        device = fn(torch.zeros(0)).device
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = buf.to(device)
        available = self.available_kernels()
        for attr in ("kernel", "small_kernel"):
            kernel = getattr(self, attr)
            if kernel is not None and kernel not in available:
                log.warning(
                    "%s: %s %r is not available on %s; using 'reference'", self.extra_repr(), attr, kernel, device
                )
                setattr(self, attr, REFERENCE if attr == "kernel" else None)
        self._rebuild_caches()
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Caches are run-time state (oneDNN's packed weights cannot even be copied): copies and pickles rebuild them.
        state = self.__dict__.copy()
        state["_caches"], state["_casts"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._rebuild_caches()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._rebuild_caches()  # the kernels' caches follow the loaded buffers

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight value (codes or float values), for the compression summary."""
        return 8

    def storage_bytes(self) -> int:
        """Bytes of the persistent state (what the safetensors file holds for this layer)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class ExportedLinear(ExportedLayer):
    """Base of the exported Linear layers: ``(..., in_features) -> (..., out_features)``; subclasses add
    :meth:`_kernel_forward` for their fast kernels on ``(tokens, in)``."""

    def random_input(self, rows: int, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
        """``(rows, in_features)`` standard normal (an example's ``shape`` only gives the rows)."""
        return torch.randn(rows, self.in_features, device=next(iter(self.buffers())).device, dtype=dtype)

    def fits(self, module: nn.Module) -> bool:
        """``module`` has this layer's ``in_features`` and ``out_features``."""
        shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        return shape == (self.in_features, self.out_features)

    @abc.abstractmethod
    def _kernel_forward(self, x: Tensor, kernel: str) -> Tensor:
        """The forward of the fast path ``kernel`` (all but reference and float) on ``x (tokens, in)``; its cache is
        ``self._caches[kernel]``."""

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel_for(x.numel() // max(x.shape[-1], 1)) if self.small_kernel else self.kernel
        if kernel == REFERENCE:
            return self.reference(x)
        if kernel == FLOAT:
            b = self.bias_or_none()
            return F.linear(self.float_input(x), self.float_weight(x.dtype), None if b is None else b.to(x.dtype))
        lead = x.shape[:-1]
        y = self._kernel_forward(x.reshape(-1, self.in_features), kernel)
        return y.reshape(*lead, self.out_features)


def float_bias(bias: Tensor | None) -> Tensor | None:
    """A float32 copy of a layer's bias (the exported layers keep bias in float32 and cast at run time)."""
    return None if bias is None else bias.detach().float().clone()


def to_spec_dtype(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (how dtypes are written in a spec)."""
    return str(dtype).removeprefix("torch.")


def from_spec_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`to_spec_dtype`; ValueError for a name that is not a torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the manifest")
    return dtype


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first float parameter or buffer outside the exported layers (float32 if none)."""
    for module in model.modules():
        if isinstance(module, ExportedLayer):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.is_floating_point():
                return t.dtype
    return torch.float32
