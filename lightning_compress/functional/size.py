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
