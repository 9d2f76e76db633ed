"""Storage accounting: bytes of models and of sparse / quantized / codebook tensors, metadata included.

Sizes are computed in bits (exact integers) and reported in bytes; 1 GB = 10^9 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FORMAT_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int2": 2}
SCALE_BITS = 32  # one float32 scale per quantization block
ZERO_POINT_BITS = 8  # one int8 zero-point per block (asymmetric only)
CENTROID_BITS = 32  # one float32 entry per codebook centroid


def format_bits(fmt: str | int) -> int:
    """Bits per value of a format name (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"int4"``, ``"int2"``) or
    an explicit positive bit count."""
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > 0:
        return fmt
    key = str(fmt).lower()
    if key not in FORMAT_BITS:
        raise ValueError(f"fmt must be one of {sorted(FORMAT_BITS)} or a positive int, got {fmt!r}")
    return FORMAT_BITS[key]


def model_bytes(num_params: float, fmt: str | int) -> float:
    """Bytes of ``num_params`` dense weights stored in ``fmt``: ``num_params * bits / 8``.

    Example: 7e9 parameters take 28 / 14 / 7 / 3.5 / 1.75 GB at 32 / 16 / 8 / 4 / 2 bits.
    """
    return num_params * format_bits(fmt) / 8


def codebook_bits(numel: int, k: int, centroid_bits: int = CENTROID_BITS) -> int:
    """K-means weight sharing (Han et al., Deep Compression): ``ceil(log2 K) * n + K * centroid_bits``.

    Example: a 512x512 matrix with K = 16: ``4 * 262144 + 16 * 32 = 1,049,088`` bits (8x under FP32).
    """
    if k < 2:
        raise ValueError(f"a codebook needs k >= 2 centroids, got {k}")
    return index_bits(k) * numel + k * centroid_bits


def index_bits(k: int) -> int:
    """Bits to address one of ``k`` choices: ``ceil(log2 k)``, at least 1."""
    return max(1, math.ceil(math.log2(k)))


@dataclass(frozen=True)
class TensorFormat:
    """How one weight tensor is (or will be) stored.

    Attributes:
        bits: bits per stored value (32 float, 2..8 integer codes).
        n_scales: number of quantization blocks (one scale each; 0 for float).
        asymmetric: whether each block also stores an int8 zero-point.
        codebook_size: K for k-means weight sharing (values are ``ceil(log2 K)``-bit indices), else None.
        nm: ``(N, M)`` when the kept values follow an N:M pattern (stored with ``ceil(log2 M)``-bit positions).
        rows: the number of output rows when whole rows are pruned: kept rows are stored densely, plus one bit
            per row saying which were kept.
    """

    bits: int = 32
    n_scales: int = 0
    asymmetric: bool = False
    codebook_size: int | None = None
    nm: tuple[int, int] | None = None
    rows: int | None = None


def tensor_bits(numel: int, nnz: int, fmt: TensorFormat) -> int:
    """Storage bits of a tensor of ``numel`` entries with ``nnz`` non-zeros in ``fmt``, metadata included.

    Values: ``nnz`` values of ``fmt.bits`` (codebook: index bits). Sparsity metadata: N:M stores
    ``ceil(log2 M)`` bits per kept value (or the unstructured format when a sparser tensor makes that cheaper);
    row pruning one bit per row; unstructured sparsity pays for a ``numel``-bit mask only when that is cheaper
    than storing the zeros densely. Quantization metadata: one
    float32 scale per block (+ int8 zero-point when asymmetric); a codebook adds ``K * 32`` bits.
    """
    value_bits = index_bits(fmt.codebook_size) if fmt.codebook_size else fmt.bits
    unstructured = min(numel * value_bits, nnz * value_bits + numel)
    if fmt.nm is not None:
        n, m = fmt.nm
        values = min(numel * n // m * (value_bits + index_bits(m)), unstructured)
    elif fmt.rows is not None:
        values = nnz * value_bits + fmt.rows
    else:
        values = unstructured
    meta = fmt.n_scales * (SCALE_BITS + (ZERO_POINT_BITS if fmt.asymmetric else 0))
    if fmt.codebook_size:
        meta += fmt.codebook_size * CENTROID_BITS
    return values + meta


def ratio(before_bits: float, after_bits: float) -> float:
    """Compression ratio ``before / after`` (inf when nothing is left)."""
    return math.inf if after_bits == 0 else before_bits / after_bits


# --- Memory calculator: bytes of a model known only by its parameter count ------------------------------------

GROUP_SIZE = 128  # weights per quantization group in the "g128" format
# Each format as it stores one group of GROUP_SIZE weights; bits per weight come from tensor_bits, so the
# calculator and the per-tensor accounting above share one definition (2:4 keeps 2 of 4 values + 2-bit positions).
WEIGHT_FORMATS: dict[str, TensorFormat] = {
    "fp32": TensorFormat(bits=32),
    "fp16 / bf16": TensorFormat(bits=16),
    "int8": TensorFormat(bits=8),
    "int4": TensorFormat(bits=4),
    "int4 g128": TensorFormat(bits=4, n_scales=1),
    "int3": TensorFormat(bits=3),
    "int2": TensorFormat(bits=2),
    "2:4 fp16": TensorFormat(bits=16, nm=(2, 4)),
    "2:4 int8": TensorFormat(bits=8, nm=(2, 4)),
}
# Adam / AdamW keep two fp32 moments per parameter, SGD with momentum one buffer, plain SGD none.
OPTIMIZER_STATES: dict[str, int] = {"adam": 2, "adamw": 2, "sgd_momentum": 1, "sgd": 0}
# Bytes per parameter of (weights, gradients, fp32 master copy) for each training precision.
TRAINING_PRECISIONS: dict[str, tuple[int, int, int]] = {"fp32": (4, 4, 0), "mixed": (2, 2, 4)}
OPTIMIZER_STATE_BYTES = 4  # optimizer states are kept in fp32


def weight_format_bits(name: str) -> float:
    """Bits per weight of a :data:`WEIGHT_FORMATS` entry, metadata included (scales, 2:4 positions).

    Example: ``"int4 g128"`` is ``4 + 32 / 128 = 4.25``; ``"2:4 fp16"`` is ``(16 + 2) / 2 = 9``; ``"2:4 int8"`` is
    ``(8 + 2) / 2 = 5`` (per-row scales not counted: they depend on the shape).
    """
    if name not in WEIGHT_FORMATS:
        raise ValueError(f"name must be one of {list(WEIGHT_FORMATS)}, got {name!r}")
    fmt = WEIGHT_FORMATS[name]
    nnz = GROUP_SIZE * fmt.nm[0] // fmt.nm[1] if fmt.nm else GROUP_SIZE
    return tensor_bits(GROUP_SIZE, nnz, fmt) / GROUP_SIZE


def weight_table(num_params: float) -> list[tuple[str, float]]:
    """``(format name, bytes)`` of ``num_params`` weights in every :data:`WEIGHT_FORMATS` entry, in order.

    Example: 7e9 parameters: fp32 28e9, fp16 / bf16 14e9, int8 7e9, int4 3.5e9, int2 1.75e9 bytes.
    """
    _check_count(num_params)
    return [(name, num_params * weight_format_bits(name) / 8) for name in WEIGHT_FORMATS]


def training_bytes(num_params: float, optimizer: str = "adam", precision: str = "fp32") -> float:
    """Bytes of weights + gradients (+ fp32 master weights) + fp32 optimizer states; activations excluded.

    ``fp32``: ``4 + 4 + 4 * states``; ``mixed`` (bf16 / fp16 weights and gradients with fp32 master weights, as
    in ZeRO, Rajbhandari et al. 2020): ``2 + 2 + 4 + 4 * states``. With Adam both are 16 bytes per parameter:
    7e9 parameters need 112e9 bytes.
    """
    _check_count(num_params)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_STATES)}, got {optimizer!r}")
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be one of {list(TRAINING_PRECISIONS)}, got {precision!r}")
    per_param = sum(TRAINING_PRECISIONS[precision]) + OPTIMIZER_STATES[optimizer] * OPTIMIZER_STATE_BYTES
    return num_params * per_param


def fits(num_bytes: float, gpus: list[float]) -> list[float]:
    """The GPU memory sizes (in GB, 1 GB = 10^9 bytes) among ``gpus`` that hold ``num_bytes``, in order.

    Nothing is reserved for the CUDA context, activations or caches. Example: ``fits(28e9, [24, 40, 80])`` is
    ``[40, 80]``.
    """
    if not num_bytes >= 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes!r}")
    bad = [g for g in gpus if not g > 0]
    if bad:
        raise ValueError(f"gpus must be positive sizes in GB, got {bad!r}")
    return [g for g in gpus if num_bytes <= g * 1e9]


def _check_count(num_params: float) -> None:
    """Raise unless ``num_params`` is a finite number >= 0."""
    if not 0 <= num_params < math.inf:
        raise ValueError(f"num_params must be a finite number >= 0, got {num_params!r}")
