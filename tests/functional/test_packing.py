import pytest
import torch

from lightning_compress.functional.masks import nm_mask
from lightning_compress.functional.packing import compress_24, decompress_24, is_24_sparse, pack_bits, unpack_bits


@pytest.mark.parametrize(
    ("values", "bits", "packed"),
    [
        ([1, 2, 3, 0], 2, [0b00111001]),  # 1 | 2 << 2 | 3 << 4 | 0 << 6 = 57
        ([3, 10, 15, 0], 4, [0xA3, 0x0F]),  # low nibble first: 3 | 10 << 4, 15 | 0 << 4
        ([1, 0, 1, 1, 0, 0, 0, 1], 1, [0b10001101]),  # 141
    ],
)
def test_pack_bits_worked_examples(values, bits, packed):
    v = torch.tensor([values], dtype=torch.uint8)
    out = pack_bits(v, bits)
    assert out.dtype == torch.uint8 and out.tolist() == [packed]
    assert torch.equal(unpack_bits(out, bits), v)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_unpack_round_trip(bits):
    torch.manual_seed(0)
    values = torch.randint(0, 2**bits, (3, 5, 16))
    packed = pack_bits(values, bits)
    assert packed.shape == (3, 5, 16 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits), values.to(torch.uint8))


def test_pack_bits_errors():
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\), got \[0, 4\]"):
        pack_bits(torch.tensor([0, 1, 2, 4]), 2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\), got \[-1, 0\]"):
        pack_bits(torch.tensor([-1, 0]), 4)
    with pytest.raises(ValueError, match=r"last dimension \(3\) must be a multiple of 4"):
        pack_bits(torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match=r"bits=3 cannot be packed; allowed: \[1, 2, 4\]"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bits=8"):
        unpack_bits(torch.zeros(8, dtype=torch.uint8), 8)


def test_is_24_sparse():
    assert is_24_sparse(torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]]))
    assert is_24_sparse(torch.zeros(2, 4))
    assert not is_24_sparse(torch.tensor([[1.0, 1, 2, 0, 0, 0, 0, 3]]))  # three non-zeros in the first group
    assert not is_24_sparse(torch.tensor([1.0, 0, 0, 0]))  # not 2-D
    assert not is_24_sparse(torch.zeros(2, 6))  # in_features not a multiple of 4


def test_compress_24_worked_example():
    # groups [0, 5, 0, -2] (non-zeros at 1, 3) and [7, 0, 0, 0] (one non-zero: keeps the zero in slot 1)
    weight = torch.tensor([[0.0, 5, 0, -2, 7, 0, 0, 0]])
    values, indices = compress_24(weight)
    assert values.tolist() == [[5.0, -2.0, 7.0, 0.0]]
    assert indices.dtype == torch.uint8 and indices.tolist() == [[1 | 3 << 2 | 0 << 4 | 1 << 6]]  # 77
    assert torch.equal(decompress_24(values, indices), weight)


def test_compress_24_groups_with_zero_or_one_non_zeros():
    # all-zero group -> slots 0, 1; single non-zero at position 3 -> slots 0 (a zero) and 3
    weight = torch.tensor([[0.0, 0, 0, 0, 0, 0, 0, 4]])
    values, indices = compress_24(weight)
    assert values.tolist() == [[0.0, 0.0, 0.0, 4.0]]
    assert unpack_bits(indices, 2).tolist() == [[0, 1, 0, 3]]
    assert torch.equal(decompress_24(values, indices), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_24_round_trip(dtype):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    weight = (w * nm_mask(w, 2, 4)).to(dtype)
    weight[0, :8] = 0  # whole empty groups too
    weight[1, 4:8] = torch.tensor([0.0, 0.0, 3.0, 0.0], dtype=dtype)  # and one with a single non-zero
    values, indices = compress_24(weight)
    assert values.shape == (16, 32) and values.dtype == dtype
    assert indices.shape == (16, 8) and indices.dtype == torch.uint8
    assert torch.equal(decompress_24(values, indices), weight)


def test_compress_24_errors():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_24(torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"in_features a multiple of 8, got \(2, 4\)"):
        compress_24(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"2-D weight.*got \(8,\)"):
        compress_24(torch.zeros(8))
