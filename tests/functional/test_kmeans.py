import math

import pytest
import torch

from lightning_compress.functional.kmeans import (
    KMEANS_INITS,
    deep_compression_bits,
    huffman_bits,
    huffman_code_lengths,
    huffman_table_bits,
    kmeans_1d,
    kmeans_init,
    nearest_centroid,
    positions_from_gaps,
    relative_index_gaps,
    sparse_relative_bits,
)
from lightning_compress.functional.size import codebook_bits, index_bits


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sse(x: torch.Tensor, centroids: torch.Tensor, indices: torch.Tensor) -> float:
    return float(((x.double() - centroids.double()[indices]) ** 2).sum())


def _assert_fixed_point(x: torch.Tensor, centroids: torch.Tensor, indices: torch.Tensor) -> None:
    """Each value is at its nearest centroid, and each non-empty cluster's centroid is the mean of its members."""
    nearest = (x[:, None] - centroids[None, :]).abs().argmin(dim=1)
    assert torch.equal(centroids[nearest], centroids[indices])  # equal distances only where centroids repeat
    for j in indices.unique().tolist():
        assert centroids[j].item() == pytest.approx(x[indices == j].double().mean().item(), abs=1e-5)


def _clustered(centres: list[float], per: int = 500, std: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    x = torch.cat([c + std * torch.randn(per, generator=g) for c in centres])
    return x[torch.randperm(x.numel(), generator=g)]


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("init", ["linear", "kmeans++"])
def test_recovers_four_separated_clusters_at_a_fixed_point(init):
    centres = [-6.0, -2.0, 1.0, 5.0]
    x = _clustered(centres)
    c, idx = kmeans_1d(x, 4, init=init, generator=_gen(1))
    assert c.dtype == torch.float32 and c.shape == (4,) and idx.dtype == torch.int64 and idx.shape == x.shape
    assert torch.allclose(c, torch.tensor(centres), atol=0.03)
    assert torch.all(c[1:] > c[:-1])
    _assert_fixed_point(x, c, idx)


@pytest.mark.parametrize("init", KMEANS_INITS)
def test_converged_result_is_a_fixed_point_on_unclustered_data(init):
    x = torch.randn(3000, generator=_gen(2))
    c, idx = kmeans_1d(x, 8, init=init, iters=10_000, generator=_gen(3))
    assert torch.all(c[1:] >= c[:-1])
    _assert_fixed_point(x, c, idx)


@pytest.mark.parametrize("init", KMEANS_INITS)
def test_sse_never_increases_from_the_init(init):
    x = torch.randn(2000, generator=_gen(4)) ** 3  # heavy tails: Lloyd moves for many iterations
    c0 = kmeans_init(x, 16, init, generator=_gen(5))
    sse = [_sse(x, c0, nearest_centroid(x, c0))]
    for iters in range(8):
        c, idx = kmeans_1d(x, 16, init=init, iters=iters, generator=_gen(5))
        sse.append(_sse(x, c, idx))
    assert sse[1] == pytest.approx(sse[0], rel=1e-12)  # iters=0 is the init itself
    assert all(b <= a * (1 + 1e-9) for a, b in zip(sse[:-1], sse[1:], strict=True))
    assert sse[-1] < sse[0]


def test_empty_clusters_keep_their_centroid():
    x = torch.cat([0.1 * torch.randn(1000, generator=_gen(12)), torch.tensor([100.0])])
    init = kmeans_init(x, 4, "linear")
    c, idx = kmeans_1d(x, 4, init="linear")
    assert torch.isfinite(c).all()
    assert torch.equal(c[1:3], init[1:3]) and c[3] == 100.0  # nothing ever comes near 33 or 67
    assert idx.bincount(minlength=4).tolist() == [1000, 0, 0, 1]


def test_inits_worked_examples():
    x = torch.arange(100.0)
    assert torch.equal(kmeans_init(x, 4, "linear"), torch.tensor([0.0, 33.0, 66.0, 99.0]))
    # quantiles (i + 0.5) / 4 of 0..99: positions 12.375, 37.125, 61.875, 86.625
    assert torch.allclose(kmeans_init(x, 4, "density"), torch.tensor([12.375, 37.125, 61.875, 86.625]))
    pp = kmeans_init(x, 4, "kmeans++", generator=_gen(0))
    assert pp.unique().numel() == 4 and torch.all(torch.isin(pp, x))  # k-means++ picks distinct data points


@pytest.mark.parametrize("seed", range(5))
def test_kmeanspp_seeds_one_centre_per_separated_cluster(seed):
    centres = torch.tensor([-6.0, -2.0, 1.0, 5.0])
    seeds = kmeans_init(_clustered(centres.tolist()), 4, "kmeans++", generator=_gen(seed))
    assert torch.allclose(seeds, centres, atol=0.5)  # D^2 sampling spreads the seeds; no Lloyd step yet


def test_seeded_generator_is_deterministic_and_used():
    x = torch.randn(5000, generator=_gen(6))
    a = kmeans_1d(x, 12, init="kmeans++", generator=_gen(7))
    b = kmeans_1d(x, 12, init="kmeans++", generator=_gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(kmeans_init(x, 12, "kmeans++", _gen(7)), kmeans_init(x, 12, "kmeans++", _gen(8)))


def test_fewer_distinct_values_than_k_reconstruct_exactly():
    x = torch.tensor([0.5, -1.0, 0.5, 3.0, 3.0, -1.0, 0.5])
    for k in (3, 8):
        c, idx = kmeans_1d(x, k)
        assert c.shape == (k,) and torch.all(c[1:] >= c[:-1])
        assert torch.equal(c[idx], x)
        assert torch.equal(nearest_centroid(x, c), idx)


def test_constant_input():
    x = torch.full((3, 50), 2.5)
    c, idx = kmeans_1d(x, 4, init="kmeans++", generator=_gen(0))
    assert torch.equal(c, torch.full((4,), 2.5)) and torch.equal(idx, torch.zeros(150, dtype=torch.int64))


@pytest.mark.parametrize("k", [1, 0, -3, 2.0, True, "4"])
def test_bad_k_is_named(k):
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        kmeans_1d(torch.randn(10), k)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"init must be one of \['linear', 'kmeans\+\+', 'density'\], got 'random'"):
        kmeans_1d(torch.randn(10), 4, init="random")
    with pytest.raises(ValueError, match="iters must be"):
        kmeans_1d(torch.randn(10), 4, iters=-1)
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d(torch.tensor([1.0, float("nan"), 2.0]), 2)
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(torch.tensor([]), 2)


def test_512x512_k16_index_stream_matches_codebook_bits():
    w = torch.randn(512, 512, generator=_gen(9))
    c, idx = kmeans_1d(w, 16)
    assert c.unique().numel() == 16 and idx.numel() == 262_144 and idx.min() >= 0 and idx.max() < 16
    stream = index_bits(16) * idx.numel() + c.numel() * 32
    assert stream == codebook_bits(w.numel(), 16) == 1_049_088
    assert huffman_bits(idx) <= index_bits(16) * idx.numel()


# ---------------------------------------------------------------- Huffman

CLRS_COUNTS = {0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5}  # a..f


def test_huffman_textbook_example():
    expected = {0: 1, 1: 3, 2: 3, 3: 3, 4: 4, 5: 4}
    assert huffman_code_lengths(CLRS_COUNTS) == expected
    assert huffman_code_lengths(torch.tensor([45, 13, 12, 16, 9, 5])) == expected
    stream = torch.repeat_interleave(torch.arange(6), torch.tensor(list(CLRS_COUNTS.values())))
    assert huffman_bits(stream[torch.randperm(100, generator=_gen(0))]) == 224


def test_huffman_single_symbol_empty_and_zero_counts():
    assert huffman_code_lengths({7: 10}) == {7: 1}
    assert huffman_bits(torch.full((5,), 7)) == 5
    assert huffman_code_lengths({}) == {} and huffman_bits(torch.tensor([], dtype=torch.int64)) == 0
    assert huffman_code_lengths(torch.tensor([0, 3, 0, 1])) == {1: 1, 3: 1}
    with pytest.raises(ValueError, match="counts must be >= 0"):
        huffman_code_lengths({0: 3, 1: -1})
    with pytest.raises(ValueError, match="integer"):
        huffman_bits(torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize("seed", range(5))
def test_huffman_kraft_equality_and_bounds(seed):
    g = _gen(seed)
    k = int(torch.randint(2, 40, (1,), generator=g))
    probs = torch.rand(k, generator=g) ** 4 + 1e-3
    symbols = torch.multinomial(probs, 3000, replacement=True, generator=g)
    counts = torch.bincount(symbols)
    lengths = huffman_code_lengths(counts)
    if len(lengths) >= 2:
        assert sum(2.0**-length for length in lengths.values()) == pytest.approx(1.0, abs=1e-12)
    n, bits = symbols.numel(), huffman_bits(symbols)
    p = counts[counts > 0].double() / n
    entropy = float(-(p * p.log2()).sum())
    assert n * entropy <= bits < n * (entropy + 1)  # Shannon's bounds for an optimal prefix code
    assert bits <= n * index_bits(len(lengths))  # never worse than fixed-length coding


def test_huffman_table_bits():
    assert huffman_table_bits({0: 1, 1: 2, 3: 2}, symbol_bits=2) == 4 * 2
    assert huffman_table_bits(huffman_code_lengths(CLRS_COUNTS), symbol_bits=3) == 8 * 3
    assert huffman_table_bits({}, symbol_bits=4) == 0
    with pytest.raises(ValueError, match="do not fit symbol_bits=2"):
        huffman_table_bits({4: 1, 0: 1}, symbol_bits=2)


# ---------------------------------------------------------------- relative indexing


def _mask(length: int, positions: list[int]) -> torch.Tensor:
    m = torch.zeros(length, dtype=torch.bool)
    m[positions] = True
    return m


def test_relative_index_paper_figure_example():
    # Han et al. Fig. 2 style: non-zeros at 1, 4, 15; 3-bit gaps hold at most 7, so the gap of 11 needs a filler at 11
    gaps, filler = relative_index_gaps(_mask(16, [1, 4, 15]), index_bits=3)
    assert gaps.tolist() == [1, 3, 7, 4] and filler.tolist() == [False, False, True, False]
    assert positions_from_gaps(gaps, filler).tolist() == [1, 4, 15]
    assert sparse_relative_bits(_mask(16, [1, 4, 15]), index_bits=3) == 4 * (32 + 3)


@pytest.mark.parametrize(
    ("positions", "gaps", "n_fillers"),
    [([0, 7], [0, 7], 0), ([0, 8], [0, 7, 1], 1), ([30], [7, 7, 7, 7, 2], 4), ([14, 15], [7, 7, 1], 1), ([], [], 0)],
)
def test_fillers_with_3bit_gaps(positions, gaps, n_fillers):
    rel = relative_index_gaps(_mask(40, positions), index_bits=3)
    assert rel.gaps.tolist() == gaps and int(rel.filler.sum()) == n_fillers
    assert positions_from_gaps(rel.gaps, rel.filler).tolist() == positions


def _fillers_by_hand(mask: torch.Tensor, index_bits: int) -> int:
    fillers, prev, max_gap = 0, 0, 2**index_bits - 1
    for p in mask.reshape(-1).nonzero().squeeze(1).tolist():
        fillers += max(0, math.ceil((p - prev) / max_gap) - 1)
        prev = p
    return fillers


@pytest.mark.parametrize(("density", "bits"), [(0.5, 2), (0.1, 4), (0.02, 5), (0.003, 3)])
def test_gaps_reconstruct_positions(density, bits):
    mask = torch.rand(37, 53, generator=_gen(int(density * 1000))) < density
    rel = relative_index_gaps(mask, bits)
    assert torch.equal(positions_from_gaps(rel.gaps, rel.filler), mask.reshape(-1).nonzero().squeeze(1))
    assert int(rel.gaps.max()) <= 2**bits - 1 and int(rel.gaps[1:].min()) >= 1
    assert int(rel.filler.sum()) == _fillers_by_hand(mask, bits)
    with pytest.raises(ValueError, match="index_bits must be an int >= 1"):
        relative_index_gaps(mask, 0)


# ---------------------------------------------------------------- Deep Compression stages


def test_deep_compression_bits_worked_example():
    w = torch.zeros(1, 16)
    w[0, [1, 4, 15]] = torch.tensor([3.4, 0.9, 1.7])
    bits = deep_compression_bits(w, k=4, index_bits=3)
    # 4 entries (1 filler). k-means: 4 x (2 + 3) + 4 x 32. Huffman: codes {2, 0, 3 (filler's zero), 1} and
    # gaps {1, 3, 7, 4} are 4 distinct symbols each -> 2 bits each; tables: 4 x 2 + 8 x 2.
    assert bits == {"dense": 512, "pruned": 140, "kmeans": 148, "huffman": 8 + 8 + 128, "huffman_table": 24}
    plain = deep_compression_bits(w, k=None, index_bits=3)
    assert plain == {"dense": 512, "pruned": 140, "huffman": 4 * 32 + 8, "huffman_table": 16}
    with pytest.raises(ValueError, match="k must be"):
        deep_compression_bits(w, k=1)


def test_deep_compression_bits_90pct_pruned_fc_layer():
    g = _gen(11)
    w = torch.randn(300, 784, generator=g)
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[torch.randperm(w.numel(), generator=g)[:23_520]] = True
    w = w * keep.view_as(w)
    bits = deep_compression_bits(w, k=32, index_bits=4)

    fillers = _fillers_by_hand(w != 0, 4)
    entries = 23_520 + fillers
    assert fillers > 0
    assert bits["dense"] == 235_200 * 32
    assert bits["pruned"] == entries * (32 + 4) == sparse_relative_bits(w, 4)
    assert bits["kmeans"] == entries * (5 + 4) + 32 * 32 == codebook_bits(entries, 32) + entries * 4
    rel = relative_index_gaps(w, 4)
    codes = torch.full((entries,), 31)
    codes[~rel.filler] = kmeans_1d(w[w != 0], 31)[1]  # fillers need the exact 0: 31 fitted clusters + 0
    assert bits["huffman"] == huffman_bits(codes) + huffman_bits(rel.gaps) + 32 * 32
    assert bits["dense"] > bits["pruned"] > bits["kmeans"] > bits["huffman"]
    assert 0 < bits["huffman_table"] <= 32 * 5 + 16 * 4


def test_unpruned_tensor_stores_no_index_stream():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    bits = deep_compression_bits(w, k=16, index_bits=5)
    assert bits["pruned"] == bits["dense"] == 32 * w.numel()
    assert bits["kmeans"] == 4 * w.numel() + 16 * 32
    assert bits["huffman"] <= bits["kmeans"]
