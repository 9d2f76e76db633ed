"""QuantizedWeight / QuantizedInput / QuantizedLayer: checked when made, dequantize by the formulas."""

import pytest
import torch

from lightning_compress.functional.quant import compute_qparams, dequantize, quantize
from lightning_compress.nn.quantized import QuantizedInput, QuantizedLayer, QuantizedWeight, round_to_nearest


def test_round_to_nearest_is_compute_qparams_then_quantize():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    for symmetric, group_size in [(True, None), (False, 8)]:
        q = round_to_nearest(w, 4, symmetric, group_size)
        s, z = compute_qparams(w, 4, symmetric, axis=None if group_size else 0, group_size=group_size)
        assert torch.equal(q.codes, quantize(w, s, z, 4)) and torch.equal(q.scale, s)
        assert q.symmetric == symmetric and (q.zero_point is None) == symmetric
        assert torch.equal(q.dequantize(), dequantize(q.codes, s, z))


def test_codebook_dequantizes_to_shared_values_and_keeps_pruned_zeros():
    codes = torch.tensor([[0, 1], [1, 0]])
    mask = torch.tensor([[True, False], [True, True]])
    q = QuantizedWeight(codes, None, None, bits=1 + 1, format="codebook", codebook=torch.tensor([0.5, -2.0, 3.0, 4.0]),
                        mask=mask)  # fmt: skip
    assert torch.equal(q.dequantize(), torch.tensor([[0.5, 0.0], [-2.0, 0.5]]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"codes": torch.full((2, 4), 9, dtype=torch.int8)}, ValueError, r"outside \[-8, 7\]"),
        ({"codes": torch.zeros(2, 4)}, TypeError, "must be int8"),
        ({"scale": torch.ones(3, 1)}, ValueError, "do not"),
        ({"zero_point": torch.zeros(2, 2)}, ValueError, "must match scale"),
        ({"bits": 9}, ValueError, r"bits must be in \[2, 8\]"),
        ({"format": "fp4"}, ValueError, "format='fp4' is not supported"),
        ({"format": "fp8", "bits": 8}, TypeError, "codes of format 'fp8' must be float8_e4m3fn"),
        (
            {"format": "fp8", "bits": 4, "codes": torch.zeros(2, 4).to(torch.float8_e4m3fn)},
            ValueError,
            "format 'fp8' has bits=8 and no zero_point",
        ),
        ({"mask": torch.ones(2, 4)}, ValueError, "mask must be bool"),
    ],
)
def test_bad_fields_are_refused(kwargs, error, match):
    fields = {"codes": torch.zeros(2, 4, dtype=torch.int8), "scale": torch.ones(2, 1), "zero_point": None, "bits": 4}
    with pytest.raises(error, match=match):
        QuantizedWeight(**{**fields, **kwargs})


def test_input_quantization_checks_and_tensors_of_a_layer():
    with pytest.raises(ValueError, match="zero_point needs a static scale"):
        QuantizedInput(8, None, torch.tensor(3.0))
    with pytest.raises(ValueError, match="positive 0-dim"):
        QuantizedInput(8, torch.tensor([0.1]))
    assert QuantizedInput(8).dynamic and not QuantizedInput(8, torch.tensor(0.1)).dynamic
    layer = QuantizedLayer(round_to_nearest(torch.randn(4, 8), 8), QuantizedInput(8, torch.tensor(0.1)))
    assert sorted(layer.tensors()) == ["input.scale", "weight.codes", "weight.scale"]
