"""The common shape of the inference layers that ``export_for_inference`` builds.

An exported layer persists only its compressed form (int8 / packed int4 codes, 2:4 values and positions, scales)
as buffers, so ``state_dict`` and the safetensors file hold exactly that. At run time it computes with one
*kernel*, chosen per device by the export's self-check (which times the candidates at the layer's real shape and
verifies each against :meth:`ExportedLinear.reference`): a fast path over core torch ops, a dense float kernel
over a dequantized cache (faster on some shapes, more memory), or the reference itself (dequantize, then an
ordinary matmul: slow and obviously right). :meth:`spec` is the JSON-able description the manifest stores;
:meth:`from_spec` rebuilds an empty layer of the same shapes for loading.
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


class ExportedLinear(nn.Module, abc.ABC):
    """Base of the exported Linear layers: ``(..., in_features) -> (..., out_features)``, any float input dtype.

    Subclasses declare ``KERNELS`` (all the names they know), ``CACHED_KERNELS`` (those holding a second,
    dense copy of the weight: never picked when the export prefers memory) and implement :meth:`spec`,
    :meth:`from_spec`, :meth:`dequantized_weight`, :meth:`reference` and :meth:`_kernel_forward`.
    """

    KERNELS: ClassVar[tuple[str, ...]] = (REFERENCE, FLOAT)
    CACHED_KERNELS: ClassVar[tuple[str, ...]] = (FLOAT,)

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = REFERENCE
        self._cache: Any = None
        self._casts: dict[torch.dtype, Tensor] = {}  # the float kernel's weight in each input dtype seen

    # ------------------------------------------------------------------------------ what subclasses provide
    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able description (shapes, bits, granularity): with the buffers, all :meth:`from_spec` needs."""

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: dict[str, Any]) -> ExportedLinear:
        """An instance with buffers of the right shapes and dtypes (contents undefined until a state dict loads)."""

    @abc.abstractmethod
    def dequantized_weight(self) -> Tensor:
        """The weight the layer represents, ``(out_features, in_features)`` float32."""

    @abc.abstractmethod
    def reference(self, x: Tensor) -> Tensor:
        """The slow, obviously-correct forward: quantize the input as the layer does, dequantize, ``F.linear``."""

    def available_kernels(self) -> list[str]:
        """Kernels usable on the layer's current device (subclasses add their fast paths)."""
        return [REFERENCE, FLOAT]

    def float_input(self, x: Tensor) -> Tensor:
        """The input of the float kernel: ``x`` itself here; layers with static activation ranges clip it first."""
        return x

    @abc.abstractmethod
    def _kernel_forward(self, x: Tensor) -> Tensor:
        """The forward of :attr:`kernel` for the fast paths (all but reference and float); ``x`` is ``(tokens, in)``."""

    def _prepare(self, kernel: str) -> Any:
        """Build the run-time cache ``kernel`` needs (None when it needs none)."""
        if kernel == FLOAT:
            return self.dequantized_weight()
        return None

    # ------------------------------------------------------------------------------ shared machinery
    def bias_or_none(self) -> Tensor | None:
        """The bias buffer, or None when the layer has none."""
        return getattr(self, "bias", None)

    def set_kernel(self, kernel: str) -> None:
        """Compute with ``kernel`` from now on (builds its cache); ValueError if unknown or unavailable here."""
        if kernel not in self.KERNELS:
            raise ValueError(
                f"kernel={kernel!r} is not a kernel of {type(self).__name__}; allowed: {list(self.KERNELS)}"
            )
        available = self.available_kernels()
        if kernel not in available:
            raise ValueError(f"kernel={kernel!r} is not available for {self.extra_repr()}; available: {available}")
        self._cache, self._casts = None, {}
        self._cache = self._prepare(kernel)
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == REFERENCE:
            return self.reference(x)
        if self.kernel == FLOAT:
            w = self._casts.get(x.dtype)
            if w is None:  # cast once per input dtype from the float32 master (never from another cast)
                w = self._casts[x.dtype] = self._cache.to(x.dtype)
            b = self.bias_or_none()
            return F.linear(self.float_input(x), w, None if b is None else b.to(x.dtype))
        lead = x.shape[:-1]
        y = self._kernel_forward(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn: Any, recurse: bool = True) -> ExportedLinear:
        # Moves follow the device only: codes and scales keep their dtypes (``model.to(torch.bfloat16)`` must not
        # round the float32 scales); the compute dtype follows the input. Caches are rebuilt on the new device.
        device = fn(torch.zeros(0)).device
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = buf.to(device)
        self._cache, self._casts = None, {}
        if self.kernel not in self.available_kernels():
            log.warning(
                "%s: kernel %r is not available on %s; using 'reference'", self.extra_repr(), self.kernel, device
            )
            self.kernel = REFERENCE
        self._cache = self._prepare(self.kernel)
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._cache, self._casts = None, {}
        self._cache = self._prepare(self.kernel)  # the kernel's cache follows the loaded buffers

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight value (codes or float values), for the compression summary."""
        return 8

    def storage_bytes(self) -> int:
        """Bytes of the persistent state (what the safetensors file holds for this layer)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


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
        if isinstance(module, ExportedLinear):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.is_floating_point():
                return t.dtype
    return torch.float32
