"""Bit packing for storage: small unsigned integers several to a byte, and the 2:4 semi-structured layout.

``pack_bits`` / ``unpack_bits`` put ``8 // bits`` values of ``bits`` bits (1, 2 or 4) into each uint8 along the
last dimension, lowest bits first (so int4 codes pack two per byte). ``compress_24`` keeps the two values of every
group of four along the input dimension that a 2:4 mask leaves, plus each one's 2-bit position in its group (the
2:4 pattern of Mishra et al. 2021; plain packed positions, not the interleaved metadata of NVIDIA's kernels);
``decompress_24`` inverts it.
"""

from __future__ import annotations

import torch
from torch import Tensor

PACK_BITS = (1, 2, 4)


def _per_byte(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; allowed: {list(PACK_BITS)}")
    return 8 // bits


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit integers along the last dimension into uint8.

    Args:
        values: integer tensor ``(..., n)`` with entries in ``[0, 2^bits)``; ``n`` a multiple of ``8 // bits``.
        bits: 1, 2 or 4.

    Returns:
        uint8 ``(..., n * bits / 8)``; value ``j`` of byte ``i`` holds ``values[..., i * (8 // bits) + j]`` in bits
        ``[j * bits, (j + 1) * bits)``.
    """
    per = _per_byte(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"values must be an integer tensor, got {values.dtype}")
    n = values.shape[-1]
    if n % per:
        raise ValueError(f"values' last dimension ({n}) must be a multiple of {per} to pack {bits}-bit values")
    v = values.to(torch.int32)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values to pack must lie in [0, {2**bits}), got [{int(v.min())}, {int(v.max())}]")
    v = v.reshape(*values.shape[:-1], n // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=values.device)
    return (v << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(..., m)`` -> uint8 ``(..., m * 8 / bits)``."""
    per = _per_byte(bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def is_24_sparse(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of each row of ``weight (out, in)`` has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def compress_24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """The kept values and packed 2-bit positions of a 2:4-sparse ``weight (out, in)``.

    In each group of 4 inputs the two kept slots are the non-zeros (a group with fewer non-zeros keeps zeros in
    its first free slots), in increasing position order.

    Returns:
        ``values (out, in / 2)`` in ``weight``'s dtype and ``indices (out, in / 8)`` uint8: the positions
        ``0..3`` of ``values``, packed four to a byte by :func:`pack_bits`.

    Raises:
        ValueError: ``weight`` is not 2-D with ``in`` a multiple of 8, or a group has more than 2 non-zeros.
    """
    if weight.dim() != 2 or weight.shape[1] % 8:
        raise ValueError(
            f"2:4 compression needs a 2-D weight with in_features a multiple of 8, got {tuple(weight.shape)}"
        )
    if not is_24_sparse(weight):
        raise ValueError("the weight is not 2:4 sparse: some group of 4 inputs has more than 2 non-zeros")
    out, k = weight.shape
    groups = weight.reshape(out, k // 4, 4)
    # rank slots: non-zeros first (stable, so positions stay increasing), then take the first two
    order = torch.sort((groups == 0).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    order = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, order).reshape(out, k // 2)
    return values, pack_bits(order.reshape(out, k // 2), 2)


def decompress_24(values: Tensor, indices: Tensor) -> Tensor:
    """Inverse of :func:`compress_24`: ``values (out, in / 2)``, ``indices (out, in / 8)`` -> dense ``(out, in)``."""
    if values.dim() != 2 or values.shape[1] % 4 or indices.shape != (values.shape[0], values.shape[1] // 4):
        raise ValueError(
            f"values (out, in/2) and indices (out, in/8) do not fit: {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    out, half = values.shape
    positions = unpack_bits(indices, 2).to(torch.int64).reshape(out, half // 2, 2)
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(out, half // 2, 2))
    return dense.reshape(out, half * 2)
