import pytest

from lightning_compress.functional.size import TensorFormat, codebook_bits, model_bytes, ratio, tensor_bits


def test_13b_fp16_is_26_gb():
    assert model_bytes(13e9, "fp16") == 26e9


@pytest.mark.parametrize(("bits", "gb"), [(32, 28), (16, 14), (8, 7), (4, 3.5), (2, 1.75)])
def test_7b_at_each_width(bits, gb):
    assert model_bytes(7e9, bits) == gb * 1e9


def test_named_formats():
    assert [model_bytes(1, f) for f in ("fp32", "fp16", "bf16", "int8", "int4", "int2")] == [4, 2, 2, 1, 0.5, 0.25]
    with pytest.raises(ValueError, match="fmt must be one of"):
        model_bytes(1, "fp8x")


def test_kmeans_512_k16():
    bits = codebook_bits(512 * 512, 16)
    assert bits == 4 * 262_144 + 16 * 32 == 1_049_088
    assert ratio(32 * 512 * 512, bits) == pytest.approx(7.9961, abs=1e-4)
    assert tensor_bits(512 * 512, 512 * 512, TensorFormat(codebook_size=16)) == bits


def test_quantized_tensor_counts_scales_and_zero_points():
    n = 64 * 128
    assert tensor_bits(n, n, TensorFormat(bits=8, n_scales=64)) == n * 8 + 64 * 32
    assert tensor_bits(n, n, TensorFormat(bits=4, n_scales=64 * 2, asymmetric=True)) == n * 4 + 128 * (32 + 8)


def test_two_four_sparse_stores_half_the_values_and_2bit_positions():
    n = 64 * 128
    assert tensor_bits(n, n // 2, TensorFormat(bits=16, nm=(2, 4))) == (n // 2) * (16 + 2)
    assert tensor_bits(n, n // 2, TensorFormat(bits=8, nm=(2, 4), n_scales=64)) == (n // 2) * 10 + 64 * 32


def test_unstructured_sparse_uses_a_bitmask_only_when_cheaper():
    n = 1000
    assert tensor_bits(n, 100, TensorFormat(bits=32)) == 100 * 32 + n
    assert tensor_bits(n, 1000, TensorFormat(bits=32)) == n * 32
    assert tensor_bits(n, 990, TensorFormat(bits=2)) == n * 2  # mask would cost more than the zeros


def test_weight_format_bits_include_metadata():
    from lightning_compress.functional.size import weight_format_bits

    assert weight_format_bits("int4 g128") == 4 + 32 / 128
    assert weight_format_bits("2:4 fp16") == (16 + 2) / 2 == 9
    assert weight_format_bits("2:4 int8") == (8 + 2) / 2 == 5
    with pytest.raises(ValueError, match="name must be one of"):
        weight_format_bits("fp8")


def test_weight_table_7b():
    from lightning_compress.functional.size import WEIGHT_FORMATS, weight_table

    table = dict(weight_table(7e9))
    assert list(table) == list(WEIGHT_FORMATS)
    assert [table[k] / 1e9 for k in ("fp32", "fp16 / bf16", "int8", "int4", "int2")] == [28, 14, 7, 3.5, 1.75]
    with pytest.raises(ValueError, match="num_params must be"):
        weight_table(-1)


def test_training_bytes():
    from lightning_compress.functional.size import training_bytes

    assert training_bytes(7e9) == training_bytes(7e9, "adam", "mixed") == 112e9  # 4+4+8 and 2+2+4+8
    assert training_bytes(1, "sgd") == 8 and training_bytes(1, "sgd_momentum", "mixed") == 12
    with pytest.raises(ValueError, match="optimizer must be one of"):
        training_bytes(1, "lion")
    with pytest.raises(ValueError, match="precision must be one of"):
        training_bytes(1, precision="fp8")


def test_fits():
    from lightning_compress.functional.size import fits

    assert fits(28e9, [24, 40, 80]) == [40, 80]
    assert fits(24e9, [24]) == [24] and fits(24e9 + 1, [24]) == []
    with pytest.raises(ValueError, match="gpus must be positive"):
        fits(1, [0])
