"""Layers the export keeps in float (convolutions, Linears outside ``targets``) whose input the compressed model
quantized.

A fake-quant layer that is not exported keeps its weight exactly on its grid as a float weight; if it also
quantized its input (QAT's static activation range, SmoothQuant's per-token quantization), the kept layer does the
same, so the exported model computes what the trained or calibrated one did: ``forward(x) = layer(q(x))`` with
``q`` the layer's input quantize-dequantize (:meth:`ActQuantMixin.fake_quantized_input`). The input quantization is
persistent state (``act_scale``, ``act_zero_point``, ``smooth`` buffers, in the state dict and the checksums) and
the manifest lists these layers under ``"inputs"`` so that :func:`~lightning_compress.export.io.load_exported`
rebuilds them. Weight keys and the module tree stay the plain model's.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_compress.export.int8_linear import ActQuantMixin
from lightning_compress.nn.quantized import QuantizedInput
from lightning_compress.nn.select import retyped

_ACT_BUFFERS = ("act_scale", "act_zero_point", "smooth")


class _InputQuantizedMixin(ActQuantMixin):
    """The wrapped layer's own forward on the quantize-dequantized input; the input's quantization parameters stay
    float32 on ``.to(dtype)`` (only the device follows)."""

    _plain_class: type[nn.Module]

    def forward(self, x: Tensor) -> Tensor:
        return self._plain_class.forward(self, self.fake_quantized_input(x))

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        saved = {k: self._buffers.pop(k) for k in _ACT_BUFFERS if k in self._buffers}
        super()._apply(fn, recurse)
        device = self.weight.device
        for key, buf in saved.items():
            self._buffers[key] = None if buf is None else buf.to(device)
        return self

    def input_spec(self) -> dict[str, Any]:
        """The manifest entry: the activation spec and the plain class's name (for the load-time check)."""
        return {**self.act_spec(), "in_features": self.weight.shape[1], "plain_class": self._plain_class.__name__}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input={self.act_spec()['act']} int{self.act_bits}"


class InputQuantizedLinear(_InputQuantizedMixin, nn.Linear):
    """A float ``nn.Linear`` that quantize-dequantizes its input first (kept by the export)."""


class InputQuantizedConv1d(_InputQuantizedMixin, nn.Conv1d):
    """A float ``nn.Conv1d`` that quantize-dequantizes its input first (kept by the export)."""


class InputQuantizedConv2d(_InputQuantizedMixin, nn.Conv2d):
    """A float ``nn.Conv2d`` that quantize-dequantizes its input first (kept by the export)."""


class InputQuantizedConv3d(_InputQuantizedMixin, nn.Conv3d):
    """A float ``nn.Conv3d`` that quantize-dequantizes its input first (kept by the export)."""


KEPT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: InputQuantizedLinear,
    nn.Conv1d: InputQuantizedConv1d,
    nn.Conv2d: InputQuantizedConv2d,
    nn.Conv3d: InputQuantizedConv3d,
}


def input_quantized(name: str, layer: nn.Module, quantized: QuantizedInput) -> nn.Module:
    """A copy of ``layer`` (sharing its Parameters) that quantizes its input as ``quantized`` says.

    Raises:
        TypeError: ``layer`` is not a Linear or Conv. ValueError: smoothing (a per-input-feature divisor along the
            last dimension) on a convolution, whose features are along dim 1.
    """
    base = next((b for b in KEPT_CLASSES if isinstance(layer, b)), None)
    if base is None:
        raise TypeError(f"layer {name!r} is a {type(layer).__name__}; allowed: Linear, Conv1d, Conv2d, Conv3d")
    if quantized.smooth is not None and base is not nn.Linear:
        raise ValueError(f"layer {name!r}: input smoothing on a {type(layer).__name__}; allowed: Linear layers only")
    new = retyped(layer, KEPT_CLASSES[base])
    object.__setattr__(new, "_plain_class", type(layer))
    new._register_act(
        quantized.bits, quantized.scale, quantized.zero_point, quantized.smooth, int(layer.weight.shape[1])
    )
    return new


def is_input_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a kept float layer with input quantization."""
    return isinstance(module, _InputQuantizedMixin)


def placeholder(name: str, layer: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """``layer`` wrapped for the manifest's ``spec`` with placeholder tensors (a state dict fills them).

    Raises:
        ValueError: ``layer`` is not of the class the spec was saved from, or has another input width.
    """
    if type(layer).__name__ != spec["plain_class"] or int(layer.weight.shape[1]) != spec["in_features"]:
        raise ValueError(
            f"layer {name!r} is {type(layer).__name__} with input width {int(layer.weight.shape[1])} in the model, "
            f"{spec['plain_class']} with {spec['in_features']} in the manifest"
        )
    args = ActQuantMixin.act_placeholders(spec)
    quantized = QuantizedInput(args["act_bits"], args["act_scale"], args["act_zero_point"], args["smooth"])
    return input_quantized(name, layer, quantized)
