"""Deep Compression's weight sharing and coding (Han et al., ICLR 2016): 1-D k-means codebooks, Huffman code
lengths, relative-index sparse storage, and the exact storage bits of each stage.

The three stages of Deep Compression store one pruned weight tensor as:

1. **pruning** with relative indices: each kept value (32 bits) plus the gap to the previous kept value in
   ``index_bits`` bits; a gap too large for its field is split with *filler* zeros (:func:`relative_index_gaps`);
2. **weight sharing**: k-means on the kept values (:func:`kmeans_1d`), each value replaced by a
   ``ceil(log2 k)``-bit cluster index, plus a codebook of ``k`` float32 centroids;
3. **Huffman coding** of both the cluster-index stream and the gap stream (:func:`huffman_bits`).

All counts are exact integers (bits). :func:`deep_compression_bits` reports every stage for one tensor.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_compress.functional.size import CENTROID_BITS, codebook_bits
from lightning_compress.functional.size import index_bits as code_width

KMEANS_INITS = ("linear", "kmeans++", "density")


def check_k(k: int, name: str = "k") -> int:
    """Validate a number of clusters: an ``int`` (not bool) ``>= 2``; returns it unchanged."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"{name} must be an int >= 2, got {k!r}")
    return k


def _flat_values(values: Tensor) -> Tensor:
    """``values`` flattened to float32, checked non-empty and finite."""
    flat = values.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("values must not be empty")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("values must be finite (found NaN or inf)")
    return flat


def _linear_init(s: Tensor, k: int) -> Tensor:
    """``k`` points evenly spaced over ``[min, max]`` of the sorted values ``s``."""
    return torch.linspace(float(s[0]), float(s[-1]), k, dtype=torch.float64, device=s.device)


def _density_init(s: Tensor, k: int) -> Tensor:
    """Quantiles ``(i + 0.5) / k`` of the sorted values ``s`` (linear interpolation between order statistics)."""
    n = s.numel()
    pos = (torch.arange(k, dtype=torch.float64, device=s.device) + 0.5) / k * (n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo
    s64 = s.double()
    return s64[lo] + frac * (s64[hi] - s64[lo])


def _kmeanspp_init(s: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): the first centre uniformly, each next one with probability
    proportional to ``D(x)^2``, the squared distance to the nearest centre chosen so far (inverse-CDF sampling)."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(k, generator=generator, dtype=torch.float64, device=device).tolist()
    s64 = s.double()
    n = s64.numel()
    centres = [s64[min(int(u[0] * n), n - 1)]]
    d2 = (s64 - centres[0]) ** 2
    for i in range(1, k):
        cdf = d2.cumsum(0)
        idx = torch.searchsorted(cdf, cdf[-1:] * u[i], right=True).clamp(max=n - 1)
        centres.append(s64[idx[0]])
        d2 = torch.minimum(d2, (s64 - centres[-1]) ** 2)
    return torch.stack(centres)


def kmeans_init(values: Tensor, k: int, init: str = "linear", generator: torch.Generator | None = None) -> Tensor:
    """Initial centroids for :func:`kmeans_1d`.

    Args:
        values: any shape, flattened; finite.
        k: number of centroids, ``>= 2``.
        init: ``"linear"`` (evenly spaced over ``[min, max]``; Han et al. found it best because it keeps the rare
            large weights), ``"kmeans++"`` (D^2 sampling, seeded by ``generator``) or ``"density"`` (the
            quantiles ``(i + 0.5) / k``, evenly spaced along the CDF).
        generator: random source of ``"kmeans++"`` (the global one when None); unused by the others.

    Returns:
        ``(k,)`` float32 centroids sorted ascending (they may repeat when ``values`` has few distinct values).
    """
    return _init_sorted(_flat_values(values).sort().values, check_k(k), _check_init(init), generator)


def _check_init(init: str) -> str:
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {list(KMEANS_INITS)}, got {init!r}")
    return init


def _init_sorted(s: Tensor, k: int, init: str, generator: torch.Generator | None) -> Tensor:
    """:func:`kmeans_init` on already sorted, validated values ``s``."""
    if init == "linear":
        c = _linear_init(s, k)
    elif init == "density":
        c = _density_init(s, k)
    else:
        c = _kmeanspp_init(s, k, generator)
    return c.float().sort().values


def nearest_centroid(values: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for each value: a ``bucketize`` against the midpoints of the centroids.

    Args:
        values: any shape (flattened).
        centroids: ``(k,)`` sorted ascending.

    Returns:
        ``(n,)`` int64 in ``[0, k)``. A value exactly on a midpoint goes to the lower centroid.
    """
    c = centroids.float()
    mids = (c[1:] + c[:-1]) / 2
    return torch.bucketize(values.detach().reshape(-1).float(), mids, right=False)


def _cluster_edges(s: Tensor, c: Tensor) -> Tensor:
    """``(k + 1,)`` edges of the nearest-centroid clusters of the sorted values ``s``: cluster ``j`` is
    ``s[edges[j]:edges[j + 1]]``. Same tie rule as :func:`nearest_centroid`."""
    mids = (c[1:] + c[:-1]) / 2
    inner = torch.searchsorted(s, mids, right=True)
    return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), s.numel())])


def _cluster_means(prefix: Tensor, edges: Tensor, previous: Tensor) -> Tensor:
    """Mean of each cluster from the float64 prefix sums of the sorted values; an empty cluster keeps its
    previous centroid (never NaN)."""
    counts = edges.diff()
    sums = prefix[edges[1:]] - prefix[edges[:-1]]
    means = (sums / counts.clamp(min=1)).float()
    return torch.where(counts > 0, means, previous).sort().values


def kmeans_1d(
    values: Tensor,
    k: int,
    init: str = "linear",
    iters: int = 300,
    tol: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """1-D k-means (Lloyd): the codebook of Deep Compression's weight sharing (Han et al. 2016, Sec. 3).

    Minimises ``sum_i (x_i - c[a_i])^2``. In 1-D the nearest-centroid clusters are intervals of the sorted values
    between midpoints of the sorted centroids, so after one sort each Lloyd step costs ``O(k log n)``: the
    assignment is a ``searchsorted`` of the ``k - 1`` midpoints, the update a difference of float64 prefix sums.
    Stops when the assignments stop changing, after ``iters`` updates, or when no centroid moves more than ``tol``.
    If ``values`` has at most ``k`` distinct values they are the centroids (the last one repeated), error 0.

    Args:
        values: any shape (flattened), finite; up to millions of values.
        k: number of clusters, an int ``>= 2``.
        init: ``"linear"``, ``"kmeans++"`` or ``"density"``; see :func:`kmeans_init`.
        iters: maximum number of Lloyd updates (``0`` returns the initial centroids).
        tol: stop once the largest centroid move is ``<= tol``.
        generator: seeds ``"kmeans++"`` for determinism.

    Returns:
        ``(centroids, indices)``: ``(k,)`` float32 sorted ascending, and ``(n,)`` int64 nearest-centroid indices.
    """
    check_k(k)
    _check_init(init)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    flat = _flat_values(values)
    s = flat.sort().values
    distinct = s[torch.cat([s.new_ones(1, dtype=torch.bool), s[1:] != s[:-1]])]
    if distinct.numel() <= k:
        c = torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
        return c, torch.searchsorted(distinct, flat)
    c = _init_sorted(s, k, init, generator)
    prefix = torch.cat([s.new_zeros(1, dtype=torch.float64), s.double().cumsum(0)])
    edges = _cluster_edges(s, c)
    for _ in range(iters):
        new_c = _cluster_means(prefix, edges, c)
        shift = float((new_c - c).abs().max())
        c, new_edges = new_c, _cluster_edges(s, new_c)
        if torch.equal(new_edges, edges) or shift <= tol:
            break
        edges = new_edges
    return c, nearest_centroid(flat, c)


def _positive_counts(counts: Tensor | Mapping[int, int]) -> list[tuple[int, int]]:
    """``(symbol, count)`` pairs with ``count > 0``, sorted by symbol; a tensor is a count per symbol index."""
    if isinstance(counts, Tensor):
        if counts.dim() != 1 or counts.is_floating_point() or counts.is_complex():
            raise ValueError(
                f"counts must be a 1-D integer tensor (count per symbol), got {counts.dtype} "
                f"of shape {tuple(counts.shape)}"
            )
        counts = dict(enumerate(counts.tolist()))
    items = sorted((int(sym), int(cnt)) for sym, cnt in counts.items())
    if any(cnt < 0 for _, cnt in items):
        raise ValueError(f"counts must be >= 0, got {dict(items)}")
    return [(sym, cnt) for sym, cnt in items if cnt > 0]


def huffman_code_lengths(counts: Tensor | Mapping[int, int]) -> dict[int, int]:
    """Code length of each symbol in an optimal prefix code (Huffman 1952) for the given frequencies.

    Repeatedly merges the two least frequent subtrees (``heapq``; ties broken by symbol, then merge order); a
    symbol's length is its depth in the final tree. The total ``sum(count * length)`` is the minimum over all
    prefix codes, and for two or more symbols the Kraft sum ``sum 2^-length`` equals 1.

    Example: counts ``{a: 45, b: 13, c: 12, d: 16, e: 9, f: 5}`` give lengths ``{a: 1, b: 3, c: 3, d: 3, e: 4,
    f: 4}``, 224 bits in total (Cormen et al., *Introduction to Algorithms*, Sec. 16.3).

    Args:
        counts: ``{symbol: count}``, or a 1-D integer tensor of counts indexed by symbol (``torch.bincount``).

    Returns:
        ``{symbol: length}`` for the symbols with a positive count; a single symbol gets length 1; none gives ``{}``.
    """
    items = _positive_counts(counts)
    n = len(items)
    if n <= 1:
        return {sym: 1 for sym, _ in items}
    heap = [(cnt, node) for node, (_, cnt) in enumerate(items)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    for node in range(n, 2 * n - 1):  # each merge creates an internal node with a larger id than its children
        (c1, a), (c2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
    depth = [0] * (2 * n - 1)
    for node in range(2 * n - 3, -1, -1):  # the root is 2n - 2; parents are visited before their children
        depth[node] = depth[parent[node]] + 1
    return {sym: depth[node] for node, (sym, _) in enumerate(items)}


def huffman_bits(symbols: Tensor) -> int:
    """Bits of the Huffman-coded stream ``symbols``: ``sum over symbols s of count(s) * length(s)``.

    The payload only: the code table is not counted (as in Deep Compression); see :func:`huffman_table_bits`.
    Never more than a fixed-length code of ``ceil(log2(#distinct))`` bits (at least 1) per symbol.

    Args:
        symbols: integer tensor, any shape (flattened).

    Returns:
        Total bits, an int (0 for an empty stream).
    """
    if symbols.is_floating_point() or symbols.is_complex():
        raise ValueError(f"symbols must be an integer tensor, got {symbols.dtype}")
    uniq, cnt = torch.unique(symbols.reshape(-1), return_counts=True)
    counts = dict(zip(uniq.tolist(), cnt.tolist(), strict=True))
    lengths = huffman_code_lengths(counts)
    return sum(counts[sym] * length for sym, length in lengths.items())


def huffman_table_bits(lengths: Mapping[int, int], symbol_bits: int) -> int:
    """Bits to store a Huffman code table as a canonical code: one length field per symbol of the alphabet.

    A canonical Huffman code (as in DEFLATE) is rebuilt from the code lengths alone, so the table is the length of
    each of the ``2^symbol_bits`` alphabet symbols (0 = unused), each in ``bit_length(max length)`` bits (the field
    width is a format constant, not counted). Deep Compression did not count this overhead; it is tiny
    (e.g. 32 symbols x 4 bits = 128 bits for a 5-bit cluster-index stream).

    Args:
        lengths: ``{symbol: code length}`` from :func:`huffman_code_lengths`; symbols in ``[0, 2^symbol_bits)``.
        symbol_bits: bits of a fixed-length symbol, so the alphabet has ``2^symbol_bits`` entries.

    Returns:
        ``2^symbol_bits * bit_length(max length)`` (0 for an empty table).
    """
    if isinstance(symbol_bits, bool) or not isinstance(symbol_bits, int) or symbol_bits < 1:
        raise ValueError(f"symbol_bits must be an int >= 1, got {symbol_bits!r}")
    bad = [sym for sym in lengths if not 0 <= sym < 2**symbol_bits]
    if bad:
        raise ValueError(f"symbols {bad} do not fit symbol_bits={symbol_bits}; allowed: [0, {2**symbol_bits})")
    if not lengths:
        return 0
    return 2**symbol_bits * max(lengths.values()).bit_length()


class RelativeIndex(NamedTuple):
    """Relative-index stream of a sparse tensor: one entry per kept value or filler, in storage order."""

    gaps: Tensor  # (entries,) int64 in [0, 2^index_bits - 1]: distance from the previous entry's position
    filler: Tensor  # (entries,) bool: True for a filler zero (stored value 0, only there to bridge a long gap)


def _check_index_bits(index_bits: int) -> int:
    if isinstance(index_bits, bool) or not isinstance(index_bits, int) or index_bits < 1:
        raise ValueError(f"index_bits must be an int >= 1, got {index_bits!r}")
    return index_bits


def relative_index_gaps(mask: Tensor, index_bits: int = 4) -> RelativeIndex:
    """Deep Compression's relative indexing (Han et al. 2016, Sec. 2, Fig. 2) of the non-zeros of ``mask``.

    The tensor is flattened row-major into one stream. Each non-zero is stored with the gap from the previous
    entry's position (the first from position 0), in ``index_bits`` bits, so a gap is at most
    ``M = 2^index_bits - 1``. A larger gap ``g`` is bridged with ``ceil(g / M) - 1`` filler zeros placed every
    ``M`` positions; each filler costs one value slot and one index slot. (The paper's figure bounds a 3-bit gap
    by 8, which does not fit in 3 bits; we use the largest ``index_bits``-bit number, 7.)

    Example, 3-bit indices: non-zeros at positions 1, 4, 15 have gaps 1, 3, 11; 11 > 7 so a filler goes at
    position 11, giving ``gaps = [1, 3, 7, 4]`` and ``filler = [F, F, T, F]``.

    Args:
        mask: any shape; non-zero (or True) entries are kept.
        index_bits: bits of one gap, ``>= 1``.

    Returns:
        :class:`RelativeIndex` ``(gaps, filler)``; ``filler.sum()`` is the number of fillers.
    """
    max_gap = 2 ** _check_index_bits(index_bits) - 1
    pos = torch.nonzero(mask.detach().reshape(-1)).squeeze(1)
    gaps = pos.diff(prepend=pos.new_zeros(1))
    entries = ((gaps + max_gap - 1) // max_gap).clamp(min=1)  # ceil(g / M) entries, at least one (g = 0)
    last = entries.cumsum(0) - 1  # where each real non-zero lands in the stream
    out = torch.full((int(entries.sum()),), max_gap, dtype=torch.int64, device=pos.device)
    out[last] = gaps - (entries - 1) * max_gap
    filler = torch.ones_like(out, dtype=torch.bool)
    filler[last] = False
    return RelativeIndex(out, filler)


def positions_from_gaps(gaps: Tensor, filler: Tensor) -> Tensor:
    """Inverse of :func:`relative_index_gaps`: flat positions of the non-zeros, ``cumsum(gaps)`` without fillers."""
    return gaps.cumsum(0)[~filler]


def sparse_relative_bits(mask: Tensor, index_bits: int = 4, value_bits: int = 32) -> int:
    """Bits of a pruned tensor stored with relative indices: ``(nnz + fillers) * (value_bits + index_bits)``.

    Args:
        mask: any shape; non-zero entries are kept (pass the pruned weight or its mask).
        index_bits: bits of one gap (see :func:`relative_index_gaps`).
        value_bits: bits of one stored value (32 for float32, ``ceil(log2 k)`` for a k-entry codebook).
    """
    return relative_index_gaps(mask, index_bits).gaps.numel() * (value_bits + index_bits)


def _value_codes(kept: Tensor, filler: Tensor, k: int) -> Tensor:
    """Cluster index of every stream entry. With fillers, one of the ``k`` codebook entries is reserved for the
    fillers' exact 0 and ``k - 1`` clusters are fitted (linear init) to the kept values; without, all ``k``."""
    n_fit = k - 1 if bool(filler.any()) else k
    codes = torch.full(filler.shape, k - 1, dtype=torch.int64, device=filler.device)
    if kept.numel() == 0 or n_fit == 1:
        codes[~filler] = 0
    else:
        codes[~filler] = kmeans_1d(kept, n_fit, init="linear")[1]
    return codes


def deep_compression_bits(
    weight: Tensor, k: int | None = 32, index_bits: int = 4, value_bits: int = 32
) -> dict[str, int]:
    """Exact storage bits of one weight tensor after each stage of Deep Compression (Han et al. 2016).

    With ``E = nnz + fillers`` stream entries (:func:`relative_index_gaps`) and ``b = index_bits``:

    - ``dense``: ``numel * value_bits``;
    - ``pruned``: ``E * (value_bits + b)`` (values and relative indices, fillers included);
    - ``kmeans`` (when ``k`` is given): ``E * (ceil(log2 k) + b) + k * 32`` (cluster indices + float32 codebook).
      When fillers exist, one codebook entry is the exact 0 they decode to and ``k - 1`` clusters are fitted;
    - ``huffman``: Huffman-coded cluster-index stream (raw ``value_bits`` values when ``k`` is None) + Huffman-coded
      gap stream + the codebook, as the paper counts it (code tables excluded);
    - ``huffman_table``: the two canonical code tables (:func:`huffman_table_bits`), reported separately and not
      included in ``huffman``.

    A tensor with no zeros stores no index stream at all (positions are implicit), so ``b`` counts as 0 there.

    Args:
        weight: the pruned weight, any shape; zeros are pruned entries.
        k: codebook size (``>= 2``), or None to skip weight sharing.
        index_bits: bits of one relative index.
        value_bits: bits of one unshared value (32 for float32).

    Returns:
        ``{"dense", "pruned", ["kmeans",] "huffman", "huffman_table"}`` bits, all ints.
    """
    if k is not None:
        check_k(k)
    w = weight.detach().reshape(-1)
    rel = relative_index_gaps(w, index_bits)
    entries = rel.gaps.numel()
    sparse = entries < w.numel()  # nothing pruned: positions are implicit and no index stream is stored
    index_bits = index_bits if sparse else 0
    bits = {"dense": w.numel() * value_bits, "pruned": entries * (value_bits + index_bits)}
    gap_bits = huffman_bits(rel.gaps) if sparse else 0
    table = huffman_table_bits(huffman_code_lengths(torch.bincount(rel.gaps, minlength=1)), index_bits) if sparse else 0
    if k is None:
        value_stream = entries * value_bits
    else:
        codes = _value_codes(w[w != 0], rel.filler, k)
        bits["kmeans"] = codebook_bits(entries, k) + entries * index_bits
        value_stream = huffman_bits(codes) + k * CENTROID_BITS
        table += huffman_table_bits(huffman_code_lengths(torch.bincount(codes, minlength=1)), code_width(k))
    bits["huffman"] = value_stream + gap_bits
    bits["huffman_table"] = table
    return bits
