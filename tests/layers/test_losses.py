"""Shared loss pieces of layers/losses.py: the soft Dice."""

import pytest
import torch

from layers.losses import soft_dice


def test_soft_dice_is_twice_the_overlap_over_the_sum_per_item_and_channel():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    b = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    b[1, 2] = 0.0
    a[1, 2] = 0.0  # two empty maps: 0, not NaN
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for i in range(2):
        for k in range(3):
            total = float(a[i, k].sum() + b[i, k].sum())
            expected[i, k] = 2 * float((a[i, k] * b[i, k]).sum()) / total if total > 0 else 0.0
    torch.testing.assert_close(soft_dice(a, b), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(soft_dice(a[:1, :1], a[:1, :1]) < 1, torch.tensor([[True]]))  # soft maps
    hard = (a > 0.5).double()
    torch.testing.assert_close(soft_dice(hard, hard)[0], torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one shape"):
        soft_dice(a, b[:, :1])
