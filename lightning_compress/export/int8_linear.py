"""Int8Linear: W8A8 inference through ``torch._int_mm`` (int8 x int8 -> int32, CPU and CUDA) or oneDNN's prepacked
int8 linear (x86 CPUs, :mod:`~lightning_compress.export.onednn`).

Weights are int8 codes with one symmetric scale per output channel (from QAT, SmoothQuant, GPTQ or
round-to-nearest). Activations are quantized to int8 at run time, per token (dynamic, ``S_t = max|x_t| / qmax``)
or with a calibrated static scale (and zero-point: QAT's asymmetric observers), after SmoothQuant's optional
per-channel division. Then ``y = (q_x W_q^T - Z_x * colsum(W_q)) * (S_x ⊗ S_w) + b``: an exact int32 accumulation
and one float rescale. The quantize - matmul - rescale path is compiled (``torch.compile``) so the activation
quantization is one fused pass; without a working compiler it runs eagerly (slower, same numbers up to rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.export.layer import FLOAT, REFERENCE, ExportedLinear, float_bias
from lightning_compress.export.onednn import (
    KERNEL_ROWS,
    ONEDNN,
    OUTPUT_DTYPES,
    U8_SHIFT,
    onednn_unsupported_reason,
    prepack_linear,
    qlinear,
    quantize_static_u8,
)
from lightning_compress.functional.fused import (
    kernels_built,
    quantize_rows_u8,
    quantize_rows_u8_eager,
    scale_rows,
    scale_rows_eager,
)
from lightning_compress.functional.quant import (
    check_bits,
    dequantize,
    fake_quantize,
    quant_range,
    token_scale,
)
from lightning_compress.nn.quantized import QuantizedInput, QuantizedLayer, QuantizedWeight, round_to_nearest

log = logging.getLogger(__name__)

INT8 = "int8"
# torch._int_mm on CUDA needs more than 16 rows and inner / output sizes that are multiples of 8.
CUDA_MIN_ROWS = 17
CUDA_MULTIPLE = 8


def check_int_channel_codes(weight: QuantizedWeight) -> None:
    """Raise ValueError unless ``weight`` is symmetric per-channel integer codes (what the int8 kernels take)."""
    if weight.format != "int" or weight.group_size is not None or not weight.symmetric:
        raise ValueError(
            f"int{weight.bits} weights of format {weight.format!r} with group_size={weight.group_size}, "
            f"symmetric={weight.symmetric} have no int8 kernel; allowed: symmetric per-channel integer codes"
        )


def int_mm_ok(k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes ``(M, k) @ (k, n)`` on ``device`` (rows are padded by :func:`w8a8_linear`)."""
    if device.type == "cuda":
        return k % CUDA_MULTIPLE == 0 and n % CUDA_MULTIPLE == 0 and k >= 16
    return device.type == "cpu"


def int_mm(q: Tensor, weight_t: Tensor) -> Tensor:
    """``torch._int_mm(q, weight_t)``: int8 ``(M, K) @ (K, N)`` -> int32, rows zero-padded to CUDA's minimum."""
    m = q.shape[0]
    if q.is_cuda and m < CUDA_MIN_ROWS:
        q = F.pad(q, (0, 0, 0, CUDA_MIN_ROWS - m))
    return torch._int_mm(q.contiguous(), weight_t)[:m]


def w8a8_linear(
    x: Tensor,
    weight_t: Tensor | None,
    weight_scale: Tensor,
    bias: Tensor | None,
    bits: int,
    act_scale: Tensor | None = None,
    act_zero_point: Tensor | None = None,
    col_sum: Tensor | None = None,
    smooth: Tensor | None = None,
    matmul: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """W8A8 linear on 2-D input: quantize ``x``, an exact integer matmul (``torch._int_mm``), rescale.

    ``q = clamp(round((x / smooth) / S_x + Z_x), qmin, qmax)`` with ``S_x`` per token (``max|x_t| / qmax``) or
    static; ``y = (q W_q^T - Z_x colsum(W_q)) (S_x ⊗ S_w) + b``.

    Args:
        x: ``(M, K)`` float activations.
        weight_t: ``(K, N)`` int8 codes, **contiguous** (a transposed view gives wrong results in ``_int_mm``).
        weight_scale: ``(N,)`` float32 per-output-channel scales.
        bias: ``(N,)`` or None.
        bits: activation code width (codes in ``[-2^(b-1), 2^(b-1) - 1]``).
        act_scale, act_zero_point: static 0-dim scale / zero-point; None for dynamic per-token scales.
        col_sum: ``(N,)`` int32 column sums of ``weight_t`` (needed with a zero-point).
        smooth: ``(K,)`` SmoothQuant divisor applied to ``x`` first, or None.
        matmul: another exact product of the codes, int8 ``(M, K)`` -> int32 ``(M, N)`` (e.g. a 2:4 sparse one);
            ``weight_t`` is then unused.

    Returns:
        ``(M, N)`` in ``x``'s dtype.
    """
    qmin, qmax = quant_range(bits)
    xs = x if smooth is None else x / smooth.to(x.dtype)
    if act_scale is None:
        s = token_scale(xs, bits)
        q = torch.clamp(torch.round(xs.float() / s), qmin, qmax)
    else:
        s = act_scale
        q = xs.float() / s if act_zero_point is None else xs.float() / s + act_zero_point
        q = torch.clamp(torch.round(q), qmin, qmax)
    q = q.to(torch.int8)
    acc = int_mm(q, weight_t) if matmul is None else matmul(q)
    if act_zero_point is not None:
        acc = acc - act_zero_point.to(torch.int32) * col_sum
    y = acc.float() * (s * weight_scale)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


_COMPILE = {"enabled": True}
_COMPILED: dict[Callable[..., Any], Callable[..., Any] | None] = {}


def compile_w8a8(enabled: bool = True) -> None:
    """Run the W8A8 paths (quantize, integer matmul, rescale) compiled (default: the activation quantization is one
    fused pass) or eagerly (no compiler)."""
    _COMPILE["enabled"] = enabled
    _COMPILED.clear()


def run_compiled(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` through ``torch.compile(fn, dynamic=True)`` (compiled once per process), falling back
    to eager for good (with a warning) if compiling fails: same math, slower."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True) if _COMPILE["enabled"] else None
    compiled = _COMPILED[fn]
    if compiled is None:
        return fn(*args, **kwargs)
    try:
        return compiled(*args, **kwargs)
    except Exception as err:  # no C++ compiler / triton: same math, eager
        log.warning("torch.compile of %s failed (%s); running it eagerly", fn.__name__, type(err).__name__)
        _COMPILED[fn] = None
        return fn(*args, **kwargs)


def fake_quantize_input(
    x: Tensor, bits: int, scale: Tensor | None, zero_point: Tensor | None, smooth: Tensor | None
) -> Tensor:
    """``x (..., in)`` as a W8A8 layer sees it: divided by ``smooth``, then fake-quantized per token
    (``S_t = max|x_t| / qmax``, when ``scale`` is None) or with the static ``scale`` / ``zero_point``."""
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    if scale is None:
        return fake_quantize(x, token_scale(x, bits), None, bits)
    return fake_quantize(x, scale, zero_point, bits)


def check_codes(codes: Tensor, bits: int, name: str = "codes") -> None:
    """``codes`` must be an int8 ``(out, in)`` tensor within the signed ``bits``-bit range."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"{name} must be a 2-D int8 tensor (out, in), got {got}")
    qmin, qmax = quant_range(bits)
    if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise ValueError(f"{name} must lie in [{qmin}, {qmax}], got [{int(codes.min())}, {int(codes.max())}]")


def channel_scale(scale: Tensor, out_features: int, name: str = "weight_scale") -> Tensor:
    """A per-output-channel scale given as ``(out,)`` or ``(out, 1, ...)``, as float32 ``(out,)``."""
    if (
        not isinstance(scale, Tensor)
        or scale.numel() != out_features
        or (scale.dim() > 1 and scale.shape[0] != out_features)
    ):
        got = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(f"{name} must hold one scale per output channel ({out_features},), got {got}")
    return scale.detach().float().reshape(out_features).clone()


class ActQuantMixin:
    """How the int8 layers quantize their input (dynamic per token, static, or not at all: weight-only), shared by
    the dense and 2:4 ones."""

    act_bits: int | None
    act_scale: Tensor | None
    act_zero_point: Tensor | None
    smooth: Tensor | None

    def _register_act(
        self, bits: int | None, scale: Tensor | None, zero_point: Tensor | None, smooth: Tensor | None, in_features: int
    ) -> None:
        if bits is None and any(t is not None for t in (scale, zero_point, smooth)):
            raise ValueError("act_bits=None (weight-only) takes no act_scale, act_zero_point or smooth")
        self.act_bits = None if bits is None else check_bits(bits, "act_bits")
        if scale is not None and (scale.numel() != 1 or not float(scale) > 0):
            raise ValueError(f"act_scale must be one positive value (static per tensor) or None, got {scale!r}")
        if zero_point is not None and (scale is None or zero_point.numel() != 1):
            raise ValueError(f"act_zero_point must be one value and needs act_scale, got {zero_point!r}")
        if smooth is not None and (smooth.shape != (in_features,) or not bool((smooth > 0).all())):
            raise ValueError(f"smooth must be ({in_features},) positive divisors, got {tuple(smooth.shape)}")
        register = self.register_buffer  # type: ignore[attr-defined]
        register("act_scale", None if scale is None else scale.detach().float().reshape(()).clone())
        register("act_zero_point", None if zero_point is None else zero_point.detach().float().reshape(()).clone())
        register("smooth", None if smooth is None else smooth.detach().float().clone())

    @staticmethod
    def act_arguments(quantized: QuantizedInput | None) -> dict[str, Any]:
        """The activation constructor arguments for ``quantized`` (``act_bits=None``, weight-only, for None)."""
        if quantized is None:
            return {"act_bits": None}
        if quantized.method != "linear":
            raise ValueError(
                f"inputs quantized with method={quantized.method!r} have no int8 kernel; allowed: 'linear'"
            )
        return {
            "act_bits": quantized.bits,
            "act_scale": quantized.scale,
            "act_zero_point": quantized.zero_point,
            "smooth": quantized.smooth,
        }

    def quantized_input(self) -> QuantizedInput | None:
        """How the layer quantizes its input, as a :class:`QuantizedInput` (None when weight-only)."""
        if self.act_bits is None:
            return None
        return QuantizedInput(self.act_bits, self.act_scale, self.act_zero_point, self.smooth)

    def act_spec(self) -> dict[str, Any]:
        """The activation-quantization part of a spec."""
        return {
            "act_bits": self.act_bits,
            "act": "none" if self.act_bits is None else "token" if self.act_scale is None else "tensor",
            "act_zero_point": self.act_zero_point is not None,
            "smooth": self.smooth is not None,
        }

    @staticmethod
    def act_placeholders(spec: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments with placeholder tensors for the activation part of ``spec``."""
        static = spec["act"] == "tensor"
        return {
            "act_bits": spec["act_bits"],
            "act_scale": torch.ones(()) if static else None,
            "act_zero_point": torch.zeros(()) if spec["act_zero_point"] else None,
            "smooth": torch.ones(spec["in_features"]) if spec["smooth"] else None,
        }

    def fake_quantized_input(self, x: Tensor) -> Tensor:
        """The input as the layer sees it: divided by ``smooth``, fake-quantized per token or statically (``x`` as
        is when weight-only)."""
        if self.act_bits is None:
            return x
        return fake_quantize_input(x, self.act_bits, self.act_scale, self.act_zero_point, self.smooth)

    def float_input(self, x: Tensor) -> Tensor:
        """The float kernel's input: fake-quantized as :meth:`fake_quantized_input` does (one compiled pass), so the
        float kernel computes the layer's own function (the quantized model's), only with float accumulation."""
        if getattr(self, "act_bits", None) is None:  # weight-only, or a float 2:4 layer
            return x
        return run_compiled(fake_quantize_input, x, self.act_bits, self.act_scale, self.act_zero_point, self.smooth)

    def code_sums(self, codes: Tensor) -> Tensor | None:
        """int32 ``(out,)`` sums of the weight codes ``(out, in)`` over inputs: the zero-point correction
        ``Z_x · colsum(W_q)``, needed only with an activation zero-point (None otherwise)."""
        return codes.sum(dim=1, dtype=torch.int32) if self.act_zero_point is not None else None

    def w8a8(self, x: Tensor, weight_t: Tensor, weight_scale: Tensor, col_sum: Tensor | None) -> Tensor:
        """The ``_int_mm`` path on ``(tokens, in)`` with codes ``weight_t (in, out)``."""
        return run_compiled(
            w8a8_linear, x, weight_t, weight_scale, getattr(self, "bias", None), self.act_bits,
            self.act_scale, self.act_zero_point, col_sum, self.smooth,
        )  # fmt: skip

    def onednn_available(self, device: torch.device) -> bool:
        """Whether the ``"onednn"`` kernel runs here: quantized inputs, a CPU, oneDNN int8 on it."""
        return self.act_bits is not None and device.type == "cpu" and onednn_unsupported_reason() is None

    def onednn_cache(self, codes: Tensor, weight_scale: Tensor) -> OnednnLinearCache:
        """The ``"onednn"`` kernel's state for int8 codes ``(out, in)``: prepacked weight, float input qparams."""
        static = self.act_scale is not None
        zero = 0.0 if self.act_zero_point is None else float(self.act_zero_point)
        bias = getattr(self, "bias", None)
        return OnednnLinearCache(
            prepack_linear(codes), weight_scale.float().contiguous(), None if bias is None else bias.float(),
            float(self.act_scale) if static else 1.0, zero,
        )  # fmt: skip

    def onednn_linear(self, x: Tensor, cache: OnednnLinearCache) -> Tensor:
        """oneDNN's int8 linear on ``x (tokens, in)``: static inputs fully fused (quantize, then matmul + rescale +
        bias + output dtype in oneDNN's epilogue); per-token inputs with ``S_x = 1`` and each row scaled after."""
        if x.shape[0] == 0:
            return x.new_zeros(0, cache.weight_scale.shape[0])
        out = x.dtype if x.dtype in OUTPUT_DTYPES else torch.float32
        if self.act_scale is None:  # up to KERNEL_ROWS one C++ pass each (no compiled-call overhead), else compiled
            small = x.shape[0] <= KERNEL_ROWS and kernels_built()
            run = (lambda fn, *args: fn(*args)) if small else run_compiled
            u, s = run(quantize_rows_u8 if small else quantize_rows_u8_eager, x, self.act_bits, self.smooth)
            y = qlinear(u, 1.0, U8_SHIFT, cache.packed, cache.weight_scale, None, torch.float32)
            return run(scale_rows if small else scale_rows_eager, y, s, cache.bias, x.dtype)
        u = run_compiled(quantize_static_u8, x, self.act_bits, cache.x_scale, cache.x_zero_point, self.smooth)
        bias = None if cache.bias is None else cache.bias.to(out)
        zero_point = int(cache.x_zero_point) + U8_SHIFT
        return qlinear(u, cache.x_scale, zero_point, cache.packed, cache.weight_scale, bias, out).to(x.dtype)


@dataclass
class OnednnLinearCache:
    """The ``"onednn"`` kernel's run-time state: the prepacked codes, float32 ``(out,)`` scales and bias, and the
    static input scale and zero-point as Python floats (1 and 0 for per-token inputs)."""

    packed: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    x_scale: float
    x_zero_point: float


class Int8Linear(ActQuantMixin, ExportedLinear):
    """W8A8 linear: int8 per-channel weights, int8 activations, ``torch._int_mm``. Shapes as ``nn.Linear``.

    Kernels: ``"int8"`` (compiled quantize + ``_int_mm`` + rescale: CUDA, and CPUs where it wins), ``"onednn"``
    (x86 CPUs: oneDNN's prepacked int8 linear, :mod:`~lightning_compress.export.onednn`), ``"float"`` (a
    dequantized float weight on the fake-quantized input: what the export keeps where int8 is slower than bf16),
    ``"reference"`` (fake-quantize the input, dequantize the weight, ``F.linear``: equal to the fake-quant model).

    Args:
        codes: ``(out, in)`` int8 weight codes (symmetric, zero-point 0).
        weight_scale: ``(out,)`` or ``(out, 1)`` per-channel scales.
        bias: ``(out,)`` or None.
        act_bits: activation code width (8 for W8A8; QAT's lower widths also run through int8); None for
            weight-only int8 (what a QAT layer without activation quantization computes: kernels reference and
            float only, since torch's weight-only int8 matmul is far slower than a dequantized bf16 one on CPU).
        act_scale: static per-tensor activation scale, or None for dynamic per-token scales.
        act_zero_point: static zero-point (asymmetric activations), or None.
        smooth: ``(in,)`` SmoothQuant divisor of the input, or None.
    """

    KERNELS: ClassVar[tuple[str, ...]] = (REFERENCE, FLOAT, INT8, ONEDNN)
    # "onednn" holds the codes reordered into oneDNN's layout (one more int8 copy), not a dense float copy
    CACHED_KERNELS: ClassVar[tuple[str, ...]] = (FLOAT,)

    def __init__(
        self,
        codes: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None = None,
        act_bits: int | None = 8,
        act_scale: Tensor | None = None,
        act_zero_point: Tensor | None = None,
        smooth: Tensor | None = None,
    ) -> None:
        check_codes(codes, 8)
        out_features, in_features = codes.shape
        scale = channel_scale(weight_scale, out_features)
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
        super().__init__(in_features, out_features)
        self.register_buffer("weight_t", codes.detach().t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", float_bias(bias))
        self._register_act(act_bits, act_scale, act_zero_point, smooth, in_features)

    @classmethod
    def from_module(cls, linear: nn.Linear, act_bits: int | None = 8) -> Int8Linear:
        """Round-to-nearest int8 per output channel of a float ``linear``, dynamic per-token activations (none
        with ``act_bits=None``)."""
        act = None if act_bits is None else QuantizedInput(act_bits)
        return cls.from_quantized(round_to_nearest(linear.weight, 8), linear.bias, act)

    @classmethod
    def from_quantized(
        cls, weight: QuantizedWeight, bias: Tensor | None = None, input: QuantizedInput | None = None
    ) -> Int8Linear:
        """The layer for symmetric per-channel codes of 8 bits or fewer and their input quantization (None:
        weight-only).

        Raises:
            ValueError: codes with groups, zero-points or of format ``"codebook"`` (no integer kernel for them).
        """
        check_int_channel_codes(weight)
        return cls(weight.codes, weight.scale, bias, **cls.act_arguments(input))

    def spec(self) -> dict[str, Any]:
        shape = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}
        return {**shape, **self.act_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Int8Linear:
        out, k = spec["out_features"], spec["in_features"]
        bias = torch.zeros(out) if spec["bias"] else None
        return cls(torch.zeros(out, k, dtype=torch.int8), torch.ones(out), bias, **cls.act_placeholders(spec))

    def quantized(self) -> QuantizedLayer:
        """The stored weight and input quantization as a :class:`QuantizedLayer` (8-bit symmetric per-channel codes)."""
        weight = QuantizedWeight(self.weight_t.t().contiguous(), self.weight_scale[:, None], None, 8)
        return QuantizedLayer(weight, self.quantized_input())

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.weight_t.t(), self.weight_scale[:, None], torch.zeros(())).contiguous()

    def reference(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.fake_quantized_input(x), self.dequantized_weight().to(x.dtype), b)

    def available_kernels(self) -> list[str]:
        kernels = super().available_kernels()
        device = self.weight_t.device
        if self.act_bits is not None and int_mm_ok(self.in_features, self.out_features, device):
            kernels.append(INT8)
        if self.onednn_available(device):
            kernels.append(ONEDNN)
        return kernels

    def _prepare(self, kernel: str) -> Any:
        if kernel == INT8:
            return self.code_sums(self.weight_t.t())
        if kernel == ONEDNN:
            return self.onednn_cache(self.weight_t.t(), self.weight_scale)
        return super()._prepare(kernel)

    def _kernel_forward(self, x: Tensor, kernel: str) -> Tensor:
        if kernel == ONEDNN:
            return self.onednn_linear(x, self._caches[ONEDNN])
        return self.w8a8(x, self.weight_t, self.weight_scale, self._caches[INT8])

    def extra_repr(self) -> str:
        act = "weight-only" if self.act_bits is None else "per-token" if self.act_scale is None else "static"
        return f"in={self.in_features}, out={self.out_features}, act={act}, kernel={self.kernel!r}"
