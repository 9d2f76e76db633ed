"""Wanda's mask against a slow per-row / per-group reference."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.functional.wanda import wanda_mask, wanda_scores


def _reference(weight, sq_norms, sparsity, nm):
    mask = torch.ones_like(weight, dtype=torch.bool)
    norms = sq_norms.sqrt()
    for i in range(weight.shape[0]):
        scores = [abs(float(weight[i, j])) * float(norms[j]) for j in range(weight.shape[1])]
        if nm is None:
            order = sorted(range(len(scores)), key=scores.__getitem__)
            for j in order[: round(sparsity * len(scores))]:
                mask[i, j] = False
        else:
            n, m = nm
            for g in range(0, len(scores), m):
                order = sorted(range(g, g + m), key=scores.__getitem__)
                for j in order[: m - n]:
                    mask[i, j] = False
    return mask


@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.3, None), (0.0, None), (None, (2, 4)), (None, (1, 4))])
def test_wanda_mask_is_the_per_row_ranking_of_weight_times_input_norm(sparsity, nm):
    g = torch.Generator().manual_seed(0)
    weight, sq_norms = torch.randn(6, 16, generator=g), torch.rand(16, generator=g) * 10
    sq_norms[3] = 0.0  # a dead input: its weights score 0 and go first
    got = wanda_mask(weight, sq_norms, 0.5 if sparsity is None else sparsity, nm)
    assert torch.equal(got, _reference(weight, sq_norms, sparsity, nm))
    if nm is None:
        assert set(got.sum(1).tolist()) == {16 - round((sparsity or 0) * 16)}  # every row loses the same count
    if sparsity == 0.5:
        assert not got[:, 3].any()


def test_wanda_differs_from_magnitude_where_inputs_differ():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sq_norms = torch.tensor([100.0, 1.0, 1.0, 0.01])  # the small first weight sees the large input
    assert wanda_mask(weight, sq_norms, 0.5).tolist() == [[True, False, True, False]]
    assert torch.allclose(wanda_scores(weight, sq_norms), torch.tensor([[10.0, 2.0, 3.0, 0.4]]))
    with pytest.raises(ValueError, match=r"expected weight \(out, in\) and input_sq_norms \(in,\)"):
        wanda_scores(weight, torch.ones(3))
