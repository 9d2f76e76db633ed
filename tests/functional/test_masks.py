import pytest
import torch

from lightning_compress.functional.masks import (
    global_magnitude_masks,
    group_head_masks,
    head_mask,
    magnitude_mask,
    nm_mask,
    parse_nm,
    row_mask,
    row_scores,
)


def test_worked_example_keep_three():
    w = torch.tensor([5.0, 0.3, -0.4, -2.1, 0.01, 1.7])
    assert torch.equal(w * magnitude_mask(w, 0.5), torch.tensor([5.0, 0, 0, -2.1, 0, 1.7]))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_magnitude_mask_keeps_exact_count_of_largest(sparsity):
    torch.manual_seed(0)
    w = torch.randn(50, 40)
    mask = magnitude_mask(w, sparsity)
    kept = int(mask.sum())
    assert kept == w.numel() - round(sparsity * w.numel())
    if 0 < kept < w.numel():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_magnitude_mask_exact_with_ties():
    w = torch.ones(10)
    assert int(magnitude_mask(w, 0.3).sum()) == 7


def test_global_masks_rank_across_tensors():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([10.0, 20.0, 0.5, 30.0])
    ma, mb = global_magnitude_masks([a, b], 0.5)
    assert torch.equal(ma, torch.tensor([False, False, False, True]))
    assert torch.equal(mb, torch.tensor([True, True, False, True]))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2), (3, 4)])
def test_nm_every_group_keeps_n_largest(n, m):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    mask = nm_mask(w, n, m)
    groups, keep = w.abs().reshape(-1, m), mask.reshape(-1, m)
    assert torch.all(keep.sum(dim=1) == n)
    kept_min = torch.where(keep, groups, torch.inf).amin(dim=1)
    dropped_max = torch.where(~keep, groups, -torch.inf).amax(dim=1)
    assert torch.all(kept_min >= dropped_max)


def test_nm_conv_groups_run_along_input_channels():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    mask = nm_mask(w, 2, 4)
    per_position = mask.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.all(per_position.sum(dim=1) == 2)


def test_nm_rejects_bad_input():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        nm_mask(torch.randn(4, 6))
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.randn(4, 8), 4, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_nm("5:4")
    with pytest.raises(ValueError, match="'N:M'"):
        parse_nm("2-4")
    assert parse_nm("2:4") == (2, 4)


def test_row_mask_removes_lowest_l1_rows():
    w = torch.tensor([[1.0, -1.0], [0.1, 0.1], [-3.0, 0.0], [0.5, -0.4]])
    assert torch.equal(row_scores(w), torch.tensor([2.0, 0.2, 3.0, 0.9]))
    mask = row_mask(w, 0.5)
    assert torch.equal(mask.all(dim=1), torch.tensor([True, False, True, False]))
    assert torch.equal(mask.any(dim=1), mask.all(dim=1))


def test_row_mask_conv_filters():
    w = torch.randn(6, 3, 3, 3)
    w[2] *= 0.01
    mask = row_mask(w, 1 / 6)
    assert not mask[2].any() and mask[[0, 1, 3, 4, 5]].all()


def test_head_mask_rows_and_columns():
    w = torch.ones(8, 4)
    w[2:4] *= 0.1  # head 1 of 4 (head size 2) is weakest
    mask = head_mask(w, head_size=2, sparsity=0.25, dim=0)
    assert not mask[2:4].any() and mask[[0, 1, 4, 5, 6, 7]].all()
    wt = w.t().contiguous()
    assert torch.equal(head_mask(wt, head_size=2, sparsity=0.25, dim=1), mask.t())
    with pytest.raises(ValueError, match="head_size=3"):
        head_mask(w, head_size=3, sparsity=0.5)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan")])
def test_sparsity_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_mask(torch.randn(4), bad)


def test_group_head_masks_remove_the_same_head_everywhere():
    torch.manual_seed(0)
    q, k, v, o = (torch.randn(8, 8) for _ in range(4))
    bias = torch.randn(8)
    for t in (q, k, v):
        t[4:6] *= 0.01  # head 2 (head size 2) is weak in q, k, v ...
    o[:, 4:6] *= 0.01  # ... and in the output columns
    masks = group_head_masks([(q, 0), (k, 0), (v, 0), (bias, 0), (o, 1)], head_size=2, sparsity=0.25)
    for m in masks[:3]:
        assert not m[4:6].any() and m[[0, 1, 2, 3, 6, 7]].all()
    assert torch.equal(masks[3], torch.tensor([True] * 4 + [False] * 2 + [True] * 2))
    assert not masks[4][:, 4:6].any() and masks[4][:, [0, 1, 2, 3, 6, 7]].all()
    with pytest.raises(ValueError, match="same size"):
        group_head_masks([(q, 0), (torch.randn(4, 8), 0)], 2, 0.5)
