"""AWQ's scales and clipping search against slow, written-out definitions."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.functional.awq import (
    awq_factors,
    clip_ratios,
    clip_weight,
    fake_quant_weight,
    scaled_fake_quant,
)
from lightning_compress.functional.quant import compute_qparams, dequantize, quantize


def test_factors_are_the_normalised_power_of_the_mean_activation():
    act = torch.tensor([0.5, 2.0, 8.0, 0.0])
    s = awq_factors(act, 0.5)
    raw = [max(a, 1e-4) ** 0.5 for a in act.tolist()]
    norm = (max(raw) * min(raw)) ** 0.5
    torch.testing.assert_close(s, torch.tensor([r / norm for r in raw]))
    assert torch.equal(awq_factors(act, 0.0), torch.ones(4))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        awq_factors(act, 1.5)


@pytest.mark.parametrize("group_size", [None, 8])
def test_unit_scales_are_round_to_nearest(group_size):
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        scaled_fake_quant(w, torch.ones(16), 4, group_size, False), fake_quant_weight(w, 4, group_size, False)
    )


def _clip_reference(w, x, bits, group_size, symmetric):
    """Per row and group, the ratio with the least output error, trying r = 1, 0.95, ..., 0.5 in order."""
    out, width = w.shape
    g = group_size or width
    ratios = torch.ones(out, width // g)
    for o in range(out):
        for k in range(width // g):
            wg, xg = w[o, k * g : (k + 1) * g], x[:, k * g : (k + 1) * g]
            best = float("inf")
            for i in range(11):
                r = 1 - i / 20
                lo, hi = min(float(wg.min()) * r, 0.0), max(float(wg.max()) * r, 0.0)
                scale, zero = compute_qparams(torch.tensor([[lo, hi]]), bits, symmetric, axis=0)
                q = dequantize(quantize(wg[None], scale, zero, bits), scale, zero)[0]
                err = float(((xg @ (wg - q)) ** 2).sum())
                if err < best:
                    best, ratios[o, k] = err, r
    return ratios


@pytest.mark.parametrize(("group_size", "symmetric"), [(None, False), (8, True), (8, False)])
def test_clip_search_is_the_per_group_output_error_search(group_size, symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 16, generator=g)
    w[1, 3] = 6.0  # an outlier worth clipping
    x = torch.randn(64, 16, generator=g) * torch.linspace(0.1, 2.0, 16)
    ratios = clip_ratios(w, x, 3, group_size, symmetric)
    assert torch.equal(ratios, _clip_reference(w, x, 3, group_size, symmetric))
    assert ratios.min() < 1  # something was clipped
    clipped = clip_weight(w, ratios)
    assert torch.all(clipped.abs() <= w.abs())
    # min-max qparams of the clipped weight are the grid the search chose for each group
    qp = compute_qparams(clipped, 3, symmetric, axis=0 if group_size is None else None, group_size=group_size)
    g = group_size or 16
    blocks = w.reshape(5, -1, g)
    lo, hi = blocks.amin(-1) * ratios, blocks.amax(-1) * ratios
    expected = compute_qparams(torch.stack([lo, hi], -1).reshape(-1, 2), 3, symmetric, axis=0)
    torch.testing.assert_close(qp.scale.reshape(-1), expected.scale.reshape(-1))
