"""SemiStructuredSparseLinear: a 2:4 semi-structured sparse Linear, float or int8 (W8A8), with CUDA sparse kernels.

In every group of 4 consecutive inputs of each output row at most 2 weights are non-zero (NVIDIA's 2:4 pattern,
Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). The layer stores only the kept values
``(out, in / 2)`` and their 2-bit positions packed four to a byte ``(out, in / 8)`` (``functional.packing``), in one
of two flavours:

- **float**: the values in the weight's own float dtype; ``y = x W^T + b`` with ``W = decompress(values, indices)``.
- **int8**: int8 codes with one float32 scale per output channel, activations quantized to int8 at run time exactly
  as :class:`~lightning_compress.export.int8_linear.Int8Linear` does (per token or static, SmoothQuant divisor):
  ``y = (q_x C^T - Z_x colsum(C)) (S_x ⊗ S_w) + b`` with ``C = decompress(values, indices)``. 4 + 1 bits per weight
  (value + position) instead of 32: ``(in/2 + in/8) / (4 in) = 0.156`` of the fp32 weight.

Kernels: ``"reference"`` (decompress, dequantize, ``F.linear``); ``"float"`` (a cached dense float weight);
``"int8"`` / ``"onednn"`` (int8 flavour: a cached dense int8 copy through ``torch._int_mm`` / oneDNN, as
:class:`~lightning_compress.export.int8_linear.Int8Linear`); ``"sparse"`` (CUDA only: the 2:4
sparse tensor cores through torch's semi-structured support: ``SparseSemiStructuredTensor`` in fp16/bf16 for the
float flavour, ``torch._cslt_sparse_mm(..., out_dtype=torch.int32)`` (cuSPARSELt, exact int32 accumulation, then the
W8A8 rescale) for the int8 flavour). ``"sparse"`` is offered only where torch's backend takes the layer's shape
(``_DTYPE_SHAPE_CONSTRAINTS`` of ``torch/sparse/semi_structured.py``) and a small probe matmul on the device gives
exactly the right numbers.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.sparse import (
    SparseSemiStructuredTensor,
    SparseSemiStructuredTensorCUSPARSELT,
    SparseSemiStructuredTensorCUTLASS,
)

from lightning_compress.export.int8_linear import (
    INT8,
    ActQuantMixin,
    channel_scale,
    check_codes,
    check_int_channel_codes,
    int_mm_ok,
    w8a8_linear,
)
from lightning_compress.export.layer import FLOAT, REFERENCE, ExportedLinear, float_bias, from_spec_dtype, to_spec_dtype
from lightning_compress.export.onednn import ONEDNN
from lightning_compress.functional.masks import nm_mask
from lightning_compress.functional.packing import compress_24, decompress_24, pack_bits
from lightning_compress.functional.quant import dequantize
from lightning_compress.nn.quantized import QuantizedInput, QuantizedWeight

SPARSE = "sparse"
FLAVOURS = (FLOAT, INT8)
# Float dtypes the float flavour stores its values in; the CUDA 2:4 kernels compute in the two half types.
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# compress_24 packs 4 two-bit positions per byte: two groups of 4 inputs.
IN_MULTIPLE = 8
SPEC_KEYS = ("in_features", "out_features", "bias", "flavour")
SparseBackend = type[SparseSemiStructuredTensor]


# ---------------------------------------------------------------------------------------------- CUDA backends
def sparse_backend(device: torch.device) -> SparseBackend | None:
    """torch's 2:4 backend on ``device``: cuSPARSELt where torch has it, else CUTLASS on sm8x, else None.

    (CUTLASS's ``_sparse_semi_structured_mm`` is built for Ampere only; cuSPARSELt runs on sm80 and later.)
    """
    if device.type != "cuda":
        return None
    major = torch.cuda.get_device_capability(device)[0]
    if torch.backends.cusparselt.is_available() and major >= 8:
        return SparseSemiStructuredTensorCUSPARSELT
    return SparseSemiStructuredTensorCUTLASS if major == 8 else None


def cslt_int8_mm(packed: Tensor, q: Tensor) -> Tensor:
    """Exact int8 2:4 matmul: codes ``q (M, K)`` times a ``torch._cslt_compress``-ed ``(N, K)`` weight.

    cuSPARSELt takes the dense operand column-major (``q.t()`` of a row-major ``q``; a row-major one is rejected
    for int8) with at least ``dense_min_rows`` (16) rows, so ``q`` is zero-padded to a multiple of that.

    Returns:
        int32 ``(M, N)``: ``q C^T`` accumulated exactly in int32 (as ``torch._int_mm``).
    """
    rows = SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[torch.int8].dense_min_rows
    m = q.shape[0]
    padded = F.pad(q, (0, 0, 0, max(rows, -(-m // rows) * rows) - m)).contiguous()
    acc = torch._cslt_sparse_mm(packed, padded.t(), out_dtype=torch.int32)  # (N, M_padded)
    return acc[:, :m].t().contiguous()


@functools.cache
def _probe_ok(backend: SparseBackend, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this layer's ``"sparse"`` path computes a small 2:4 product exactly on ``device`` (cached).

    Small integers (``|w| <= 2``, ``x`` in ``{-1, 0, 1}``, 128 inputs) keep every sum exact even in bf16, so any
    error (an unsupported layout, a wrong transpose) shows as a mismatch rather than rounding.
    """
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (64, 128), generator=gen)
    w = w * nm_mask(torch.rand(64, 128, generator=gen))
    x = torch.randint(-1, 2, (16, 128), generator=gen)
    expected = (x @ w.t()).to(device)
    w, x = w.to(device, dtype), x.to(device, dtype)
    try:
        got = cslt_int8_mm(torch._cslt_compress(w), x) if dtype == torch.int8 else F.linear(x, backend.from_dense(w))
        return bool(torch.equal(got.to(torch.int64), expected))
    except (RuntimeError, NotImplementedError):
        return False


# ---------------------------------------------------------------------------------------------- validation
def _check_weight(weight: Tensor) -> None:
    """``weight`` must be a 2-D float or int8 ``(out, in)`` tensor, ``in`` a multiple of 8, 2:4 sparse."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.dtype not in (*VALUE_DTYPES, torch.int8):
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        allowed = [to_spec_dtype(d) for d in (*VALUE_DTYPES, torch.int8)]
        raise TypeError(f"weight must be a 2-D (out, in) tensor of dtype {allowed}, got {got}")
    out_features, in_features = weight.shape
    if in_features % IN_MULTIPLE or in_features == 0 or out_features == 0:
        raise ValueError(
            f"weight {tuple(weight.shape)}: in_features={in_features} must be a positive multiple of {IN_MULTIPLE} "
            "(2:4 positions are packed two groups of 4 to a byte) and out_features positive"
        )
    counts = (weight.detach().reshape(out_features, -1, 4) != 0).sum(-1)
    if bool((counts > 2).any()):
        row, group = (int(i) for i in (counts > 2).nonzero()[0])
        raise ValueError(
            f"weight is not 2:4 sparse: row {row}, inputs {4 * group}..{4 * group + 3} hold {int(counts[row, group])} "
            "non-zeros; allowed: at most 2 of every 4 consecutive inputs"
        )


def _check_flavour_args(
    weight: Tensor,
    weight_scale: Tensor | None,
    act_bits: int | None,
    act_scale: Tensor | None,
    act_zero_point: Tensor | None,
    smooth: Tensor | None,
) -> None:
    """int8 codes need ``weight_scale``; a float weight takes neither a scale nor activation quantization."""
    if weight.dtype == torch.int8:
        check_codes(weight, 8, "weight")
        if weight_scale is None:
            raise ValueError("weight_scale is required with int8 codes (out,) or (out, 1); got None")
        return
    if weight_scale is not None:
        raise ValueError(
            f"weight_scale must be None for a {to_spec_dtype(weight.dtype)} weight (scales belong to int8 codes), "
            f"got a tensor of shape {tuple(weight_scale.shape)}"
        )
    given = {"act_scale": act_scale, "act_zero_point": act_zero_point, "smooth": smooth}
    extra = [name for name, value in given.items() if value is not None] + (["act_bits"] if act_bits != 8 else [])
    if extra:
        raise ValueError(f"{extra} apply to int8 codes only; allowed with a float weight: their defaults")


def _check_bias(bias: Tensor | None, out_features: int) -> None:
    """``bias`` is None or a float ``(out,)`` tensor."""
    if bias is None:
        return
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"bias must be a float tensor ({out_features},) or None, got {got}")
    if bias.shape != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")


def _placeholder_indices(out_features: int, in_features: int, device: torch.device | None = None) -> Tensor:
    """Valid packed positions (slots 0 and 1 of every group) for an empty layer: uint8 ``(out, in / 8)``."""
    slots = torch.tensor([0, 1], dtype=torch.uint8, device=device).repeat(out_features, in_features // 4)
    return pack_bits(slots, 2)


# ---------------------------------------------------------------------------------------------- the layer
class SemiStructuredSparseLinear(ActQuantMixin, ExportedLinear):
    """2:4 sparse linear, float or int8 (W8A8): ``(..., in) -> (..., out)``, any float input dtype.

    Persistent state: ``values (out, in / 2)`` (the weight's dtype, or int8 codes), ``indices (out, in / 8)``
    uint8 (``compress_24``), ``weight_scale (out,)`` float32 (int8 only), ``bias (out,)`` float32, and the
    int8 flavour's activation buffers (``act_scale``, ``act_zero_point``, ``smooth``) as in Int8Linear.

    Kernels: ``"reference"``, ``"float"`` (dense float cache), ``"int8"`` (int8 flavour, dense int8 cache,
    ``torch._int_mm``), ``"sparse"`` (CUDA 2:4 tensor cores; see the module docstring).

    Args:
        weight: ``(out, in)`` 2:4-sparse weight: float (float16/bfloat16/float32/float64, stored in that dtype) for
            the float flavour, int8 codes (symmetric, zero-point 0) for the int8 flavour. ``in`` a multiple of 8.
        bias: ``(out,)`` float or None.
        weight_scale: ``(out,)`` or ``(out, 1)`` per-channel scales; required with int8 codes, None otherwise.
        act_bits, act_scale, act_zero_point, smooth: the int8 flavour's activation quantization, exactly as
            :class:`~lightning_compress.export.int8_linear.Int8Linear`; defaults (8, None, None, None) for float.

    Raises:
        TypeError: ``weight`` not a 2-D float / int8 tensor, ``bias`` not float.
        ValueError: not 2:4 sparse, ``in`` not a multiple of 8, codes out of range, scale missing or misplaced,
            activation options with a float weight, or a shape mismatch.
    """

    KERNELS: ClassVar[tuple[str, ...]] = (REFERENCE, FLOAT, INT8, ONEDNN, SPARSE)
    CACHED_KERNELS: ClassVar[tuple[str, ...]] = (FLOAT, INT8, ONEDNN)

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        weight_scale: Tensor | None = None,
        act_bits: int | None = 8,
        act_scale: Tensor | None = None,
        act_zero_point: Tensor | None = None,
        smooth: Tensor | None = None,
    ) -> None:
        _check_weight(weight)
        _check_flavour_args(weight, weight_scale, act_bits, act_scale, act_zero_point, smooth)
        out_features, in_features = weight.shape
        _check_bias(bias, out_features)
        scale = None if weight_scale is None else channel_scale(weight_scale, out_features)
        super().__init__(in_features, out_features)
        values, indices = compress_24(weight.detach())
        self._init_buffers(values, indices, scale, bias)
        if self.flavour == INT8:
            self._register_act(act_bits, act_scale, act_zero_point, smooth, in_features)

    def _init_buffers(self, values: Tensor, indices: Tensor, scale: Tensor | None, bias: Tensor | None) -> None:
        self.flavour = INT8 if values.dtype == torch.int8 else FLOAT
        self.register_buffer("values", values.contiguous())
        self.register_buffer("indices", indices.contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", float_bias(bias))

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, linear: nn.Linear) -> SemiStructuredSparseLinear:
        """The float flavour of a 2:4-pruned float ``nn.Linear`` (values kept in its weight's dtype).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``. ValueError: its weight is not 2:4 sparse.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight.detach(), linear.bias)

    @classmethod
    def from_quantized(
        cls, weight: QuantizedWeight, bias: Tensor | None = None, input: QuantizedInput | None = None
    ) -> SemiStructuredSparseLinear:
        """The int8 flavour for 2:4-sparse symmetric per-channel codes and their input quantization (None:
        weight-only).

        Raises:
            ValueError: codes with groups, zero-points or of format ``"codebook"``, or not 2:4 sparse.
        """
        check_int_channel_codes(weight)
        return cls(weight.codes, bias, weight_scale=weight.scale, **cls.act_arguments(input))

    def spec(self) -> dict[str, Any]:
        """``{"in_features", "out_features", "bias", "flavour"}`` plus ``"dtype"`` (float) or the activation spec."""
        shape = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}
        if self.flavour == FLOAT:
            return {**shape, "flavour": FLOAT, "dtype": to_spec_dtype(self.values.dtype)}
        return {**shape, "flavour": INT8, **self.act_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SemiStructuredSparseLinear:
        """An empty layer (zero values at valid 2:4 positions, unit scales) of :meth:`spec`, for ``load_state_dict``.

        Raises:
            ValueError: a key is missing, an unknown flavour or dtype, or shapes that are not a valid layer.
        """
        flavour = spec.get("flavour")
        required = (*SPEC_KEYS, "dtype") if flavour == FLOAT else SPEC_KEYS
        missing = [key for key in required if key not in spec]
        if missing:
            raise ValueError(f"spec lacks {missing} for SemiStructuredSparseLinear; required keys: {list(required)}")
        if flavour not in FLAVOURS:
            raise ValueError(f"spec flavour={flavour!r} is unknown; allowed: {list(FLAVOURS)}")
        out_f, in_f = int(spec["out_features"]), int(spec["in_features"])
        dtype = torch.int8 if flavour == INT8 else from_spec_dtype(spec["dtype"])
        if flavour == FLOAT and dtype not in VALUE_DTYPES:
            raise ValueError(f"spec dtype={spec['dtype']!r}; allowed: {[to_spec_dtype(d) for d in VALUE_DTYPES]}")
        if in_f % IN_MULTIPLE or in_f <= 0 or out_f <= 0:
            raise ValueError(f"spec shapes out={out_f}, in={in_f}: in must be a positive multiple of {IN_MULTIPLE}")
        layer = cls.__new__(cls)
        ExportedLinear.__init__(layer, in_f, out_f)
        scale = torch.ones(out_f) if flavour == INT8 else None
        bias = torch.zeros(out_f) if spec["bias"] else None
        values = torch.zeros(out_f, in_f // 2, dtype=dtype)
        layer._init_buffers(values, _placeholder_indices(out_f, in_f), scale, bias)
        if flavour == INT8:
            act = cls.act_placeholders(spec)
            layer._register_act(act["act_bits"], act["act_scale"], act["act_zero_point"], act["smooth"], in_f)
        return layer

    # ------------------------------------------------------------------------------ the weight and reference
    def decompressed(self) -> Tensor:
        """The dense 2:4 weight (float flavour) or codes (int8 flavour) ``(out, in)`` in the stored dtype."""
        return decompress_24(self.values, self.indices)

    def dequantized_weight(self) -> Tensor:
        """``W`` as float32 ``(out, in)``: the decompressed values, times ``weight_scale`` per row for int8."""
        dense = self.decompressed()
        if self.flavour == FLOAT:
            return dense.float()
        return dequantize(dense, self.weight_scale[:, None], torch.zeros((), device=dense.device))

    def reference(self, x: Tensor) -> Tensor:
        """``F.linear`` in ``x``'s dtype: float ``(x, W, b)``; int8 ``(fake-quantized x, S_w ⊙ C, b)`` as Int8Linear."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.flavour == FLOAT:
            return F.linear(x, self.decompressed().to(x.dtype), bias)
        return F.linear(self.fake_quantized_input(x), self.dequantized_weight().to(x.dtype), bias)

    # ------------------------------------------------------------------------------ kernels
    def available_kernels(self) -> list[str]:
        """``reference`` and ``float`` everywhere; ``int8`` (int8 flavour) where ``torch._int_mm`` takes the shape;
        ``sparse`` where torch's CUDA 2:4 backend takes this dtype and shape (:meth:`sparse_unsupported_reason`)."""
        kernels = super().available_kernels()
        int8_ok = self.flavour == INT8 and self.act_bits is not None
        if int8_ok and int_mm_ok(self.in_features, self.out_features, self.values.device):
            kernels.append(INT8)
        if self.flavour == INT8 and self.onednn_available(self.values.device):
            kernels.append(ONEDNN)
        if self.sparse_unsupported_reason() is None:
            kernels.append(SPARSE)
        return kernels

    def sparse_dtype(self, x_dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype the ``"sparse"`` kernel computes in: int8 codes; else fp16/bf16 inputs as given, other inputs
        in the values' dtype when that is a half type, else bf16 (fp32's range)."""
        if self.flavour == INT8:
            return torch.int8
        if x_dtype in HALF_DTYPES:
            return x_dtype
        return self.values.dtype if self.values.dtype in HALF_DTYPES else torch.bfloat16

    def sparse_unsupported_reason(self, dtype: torch.dtype | None = None) -> str | None:
        """Why the ``"sparse"`` kernel cannot run this layer on its device in ``dtype`` (default
        :meth:`sparse_dtype`), or None when it can: no backend, a shape off the backend's block multiples, or a
        failed probe matmul."""
        device = self.values.device
        backend = sparse_backend(device)
        if backend is None:
            return f"torch has no 2:4 sparse matmul on {device} (CUDA sm80+ only)"
        if self.flavour == INT8 and self.act_bits is None:
            return "weight-only int8 has no 2:4 kernel (the activations are not quantized)"
        if self.flavour == INT8 and backend is not SparseSemiStructuredTensorCUSPARSELT:
            return "the int8 2:4 matmul with int32 output needs cuSPARSELt"
        dtype = dtype or self.sparse_dtype()
        limits = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
        rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
        if self.out_features % rows or self.in_features % cols:
            return (
                f"{backend.BACKEND} needs out_features a multiple of {rows} and in_features a multiple of {cols} "
                f"for {to_spec_dtype(dtype)}, got out={self.out_features}, in={self.in_features}"
            )
        if not _probe_ok(backend, dtype, _indexed(device)):
            return f"{backend.BACKEND}'s {to_spec_dtype(dtype)} 2:4 matmul failed a probe on {device}"
        return None

    def _prepare(self, kernel: str) -> Any:
        if kernel == INT8:
            codes_t = self.decompressed().t().contiguous()
            return codes_t, self.code_sums(codes_t.t())
        if kernel == ONEDNN:
            return self.onednn_cache(self.decompressed(), self.weight_scale)
        if kernel == SPARSE:
            return self._sparse_weight(self.sparse_dtype())
        return super()._prepare(kernel)

    def _sparse_weight(self, dtype: torch.dtype) -> Any:
        """The ``"sparse"`` cache: a ``SparseSemiStructuredTensor`` (float) or ``(cuSPARSELt packed codes, colsum)``."""
        reason = self.sparse_unsupported_reason(dtype)
        if reason is not None:
            raise ValueError(f"kernel='sparse' is not available for {self.extra_repr()}: {reason}")
        dense = self.decompressed().to(dtype).contiguous()
        if self.flavour == INT8:
            return torch._cslt_compress(dense), self.code_sums(dense)
        return sparse_backend(dense.device).from_dense(dense)

    def _kernel_forward(self, x: Tensor, kernel: str) -> Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_features)
        if kernel == INT8:
            codes_t, col_sum = self._caches[INT8]
            return self.w8a8(x, codes_t, self.weight_scale, col_sum)
        if kernel == ONEDNN:
            return self.onednn_linear(x, self._caches[ONEDNN])
        if self.flavour == INT8:
            packed, col_sum = self._caches[SPARSE]
            return w8a8_linear(
                x, None, self.weight_scale, self.bias, self.act_bits, self.act_scale, self.act_zero_point,
                col_sum, self.smooth, matmul=functools.partial(cslt_int8_mm, packed),
            )  # fmt: skip
        return self._sparse_float_forward(x)

    def _sparse_float_forward(self, x: Tensor) -> Tensor:
        """``x (tokens, in)`` cast to the sparse dtype, 2:4 ``F.linear`` (torch pads the rows), cast back, bias."""
        dtype = self.sparse_dtype(x.dtype)
        if self._caches[SPARSE].dtype != dtype:
            self._caches[SPARSE] = self._sparse_weight(dtype)  # fp16 and bf16 inputs each get their own copy
        y = F.linear(x.to(dtype).contiguous(), self._caches[SPARSE]).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @property
    def weight_bits(self) -> int:
        """Bits of each kept value: 8 for int8 codes, the float values' width otherwise."""
        return self.values.element_size() * 8

    def extra_repr(self) -> str:
        kind = to_spec_dtype(self.values.dtype) if self.flavour == FLOAT else "int8"
        act = "" if self.flavour == FLOAT else f", act={self.act_spec()['act']}"
        return f"in={self.in_features}, out={self.out_features}, 2:4 {kind}{act}, kernel={self.kernel!r}"


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` (one probe per physical device)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
